"""Bytes a fused model keeps for backward, eager against torch.compile (Inductor), on the CPU.

    python benchmarks/compiled_saved_bytes.py --model resnet50 --batch 2 --size 224
    python benchmarks/compiled_saved_bytes.py --model resnet50 --batch 2 --size 224 --no-layout-opt

One training forward of the fused model (parameters excluded, as ``fastblocks bench``'s "saved
for bwd" column), then the same under ``torch.compile``. Prints the two totals and the tensors
(shape, dtype, bytes) that only the compiled model keeps. The two totals should be equal: on the
CPU, Inductor's layout optimization turns a graph with any ``aten.convolution`` to channels_last
and then saved channels_last copies of the weights that fastblocks' ops take (ResNet-50, 2x64x64,
NCHW: 44.25 MB against 8.38 MB), until the fused networks' plain convolutions became the
registered op ``fastblocks::conv2d`` when traced (``fastblocks/ops/conv2d.py``).
``--no-layout-opt`` sets ``torch._inductor.config.layout_optimization = False`` (the diagnosis);
``--channels-last`` runs model and input in that layout.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from fastblocks.bench.memory import saved_bytes
from fastblocks.models import get_model


def _saved_shapes(fn, x: torch.Tensor, exclude: set[int]) -> Counter:
    seen: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return Counter(seen.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-layout-opt", action="store_true")
    args = parser.parse_args(argv)
    if args.no_layout_opt:
        torch._inductor.config.layout_optimization = False
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = get_model(args.model).train().to(memory_format=fmt)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=fmt)
    params = list(model.parameters())
    compiled = torch.compile(model)
    compiled(x)  # compile
    _, eager = saved_bytes(lambda: model(x), params)
    _, comp = saved_bytes(lambda: compiled(x), params)
    print(f"{args.model} {args.batch}x3x{args.size}x{args.size} {'channels_last' if args.channels_last else 'nchw'}"
          f"{' layout_optimization=False' if args.no_layout_opt else ''}: saved for backward, fused eager "
          f"{eager / 1e6:.2f} MB, fused compiled {comp / 1e6:.2f} MB")  # fmt: skip
    exclude = {p.untyped_storage().data_ptr() for p in params}
    only = _saved_shapes(compiled, x, exclude) - _saved_shapes(model, x, exclude)
    for (shape, dtype, nbytes), count in sorted(only.items(), key=lambda kv: -kv[0][2] * kv[1])[:12]:
        print(f"  only compiled: {count} x {list(shape)} {dtype} ({nbytes / 1e6:.3f} MB each)")


if __name__ == "__main__":
    main()
