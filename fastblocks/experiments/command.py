"""``fastblocks experiment``: paper experiments. ``fastblocks experiment degradation`` for now.

degradation
    plain-20/56 vs ResNet-20/56 (He et al. 2016, Fig. 6), trained with the paper's recipe
    (SGD lr 0.1 -- 0.02 on the digits --, /10 at 50% and 75% of the steps, momentum 0.9, weight
    decay 1e-4, batch 128) on CIFAR-10 (``--data cifar10:DIR``) or, by default, on scikit-learn's
    bundled handwritten digits (real, offline, 1,500 train / 297 test images). Writes ``DIR/degradation.png`` (training error thin
    and dashed, test error bold, against iterations), ``DIR/degradation.json`` and
    ``DIR/degradation.md``.

    On a CPU, about 10 minutes or less: ``fastblocks experiment degradation`` with its defaults
    (digits at 16x16, 200 steps of batch 128 = ~18 epochs, lr 0.02, fused models) ran in 5 min 7 s
    on one core of a 2-core machine loaded by other jobs (``OMP_NUM_THREADS=1``; on a shared
    machine one thread is much faster than two). Final training / test error (%):

    ==========  ==========  ==========
    model       train err   test err
    ==========  ==========  ==========
    plain-20    11.1        8.4
    plain-56    65.7        60.6
    ResNet-20   1.4         2.0
    ResNet-56   1.9         2.0
    ==========  ==========  ==========

    The 56-layer plain net is stuck far above the 20-layer one (the degradation), both ResNets
    reach ~2%. At this budget the order of ResNet-20 and ResNet-56 is within noise: training is
    chaotic, and an earlier run of the same command (before a change in the fused convolution's
    rounding) ended at 9.8 / 77.8 / 1.7 / 1.7% test error. The paper's "deeper ResNet trains
    better" needs the CIFAR-10 run below.

    On a GPU with CIFAR-10 (the python batches, extracted; nothing is downloaded), the paper's
    setting -- 64k iterations of batch 128, ~164 epochs, 32x32, lr 0.1 -- is the default there::

        fastblocks experiment degradation --data cifar10:~/data/cifar-10-batches-py \\
            --output runs/degradation-cifar10

    and ``--steps 8000`` (~20 epochs) for a shorter look. (Not run yet: the machine these
    numbers come from has neither a GPU nor CIFAR-10.)
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fastblocks experiment`` subcommands and their options."""
    from fastblocks.experiments import degradation

    sub = p.add_subparsers(dest="experiment", required=True)
    d = sub.add_parser(
        "degradation",
        help="plain-20/56 vs ResNet-20/56 training and test error (He et al. 2016, Fig. 6)",
        description=__doc__.split("degradation\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument(
        "--data", default="digits",
        help="digits (default: scikit-learn's bundled 8x8 digits, upsampled; offline) or cifar10:DIR",
    )  # fmt: skip
    d.add_argument(
        "--steps", type=int, default=None,
        help="SGD iterations per model (default: 64000 on CIFAR-10, the paper's; 200 on the digits)",
    )  # fmt: skip
    d.add_argument("--batch-size", type=int, default=128, help="batch size (default 128, the paper's)")
    d.add_argument(
        "--lr", type=float, default=None,
        help="initial learning rate (default: 0.1 on CIFAR-10 as the paper; 0.02 on the digits, where ResNet-56 "
        "diverges at 0.1)",
    )  # fmt: skip
    d.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (default 1e-4)")
    d.add_argument(
        "--image-size", type=int, default=None, help="image height/width (default: 32 on CIFAR-10, 16 on the digits)"
    )
    d.add_argument(
        "--models", type=degradation.models_arg, default=degradation.DEFAULT_MODELS,
        help="comma-separated registry names (default plain20,plain56,resnet20,resnet56)",
    )  # fmt: skip
    d.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE",
        help="builder keyword argument for every model (Python literal), e.g. 'widths=(8,16,32)'",
    )  # fmt: skip
    d.add_argument("--output", default="runs/degradation", metavar="DIR", help="output directory")
    d.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    fused = d.add_mutually_exclusive_group()
    fused.add_argument("--fused", dest="fused", action="store_true", default=True, help="fused models (default)")
    fused.add_argument("--eager", dest="fused", action="store_false", help="eager models")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    d.add_argument("--num-workers", type=int, default=0, help="batch-loading worker processes (default 0)")
    d.add_argument("--deterministic", action="store_true", help="deterministic algorithms")


def run(args: argparse.Namespace) -> int:
    """Run the chosen experiment; 0 on success, 1 with a one-line message on a user error."""
    from fastblocks.experiments.degradation import DegradationConfig, _check_models, run_degradation
    from fastblocks.train.command import _model_arg, report_error, user_errors

    try:
        _check_models(args.models)
        kwargs = dict(_model_arg(a) for a in args.model_arg)
        cfg = DegradationConfig(
            data=args.data,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            image_size=args.image_size,
            models=tuple(args.models),
            model_kwargs=kwargs,
            output=args.output,
            seed=args.seed,
            fused=args.fused,
            device=args.device,
            deterministic=args.deterministic,
            num_workers=args.num_workers,
        )
        run_degradation(cfg, log=lambda s: print(s, flush=True), command=getattr(args, "command_line", None))
    except (*user_errors(), argparse.ArgumentTypeError) as e:
        return report_error("experiment", e)
    return 0
