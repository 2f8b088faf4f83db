"""The whole GPU run in one command: build, info, accuracy, CUDA tests, short benchmarks.

Made for the borrowed GPU machine (an H200: ~15 minutes of device time per session including its
start, at most 10 minutes per command, at most 8 files back, no network). Its ``python3`` is a
virtual environment with CUDA PyTorch, Triton, pytest, pytest-benchmark: this program uses the
interpreter it runs under (no venv of its own) and builds the extension in place.

    python3 benchmarks/gpu_check.py OUTDIR               # on the GPU machine, ~8 minutes
    python3 benchmarks/gpu_check.py OUTDIR --dry-run     # anywhere: CPU tensors, Triton's
                                                         # interpreter, tiny shapes, no build (CI)
    python3 benchmarks/gpu_check.py OUTDIR --steps accuracy,tests   # re-run some steps only

Steps, in order, each a subprocess with its own time limit (a step that fails or times out never
stops the next; all share one budget, ``--budget-s``, default 480 s):

======== ======================================================================= ==========
step     what                                                                    limit (s)
======== ======================================================================= ==========
env      nvidia-smi, Python/torch/Triton/CUDA/nvcc versions, device properties   30
build    ``setup.py build_ext --inplace`` for sm_90 only (MAX_JOBS=16)           200
info     ``fastblocks info``: the cuda and triton backends must be available     30
accuracy the accuracy harness on cuda and triton: fp32 (TF32 off/on), fp16,      150
         bf16 (pure and autocast), NCHW and channels_last
tests    ``pytest -m gpu``: every op, block and model test's CUDA cases          150
bench    ``fastblocks bench``: the op suite (eager vs fused, both layouts) and   120
         ResNet-50 / DenseNet-201 training (bf16 autocast, channels_last)
======== ======================================================================= ==========

Files written to OUTDIR (6 at most): ``summary.md`` (one line per step: status, seconds,
headline), ``log.txt`` (every step's output), ``results.json`` (the benchmarks' ``ops`` and
``models`` results, the schema of ``benchmarks/results/``, plus the accuracy summary), and
``gpu_check.tar.gz`` (everything else: per-step outputs, accuracy records, benchmark files).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Step:
    """One step: a command, its time limit, and how to read its headline from the output."""

    name: str
    limit_s: float
    doc: str


STEPS = [
    Step("env", 30, "versions and device"),
    Step("build", 200, "the extension, in place, for sm_90"),
    Step("info", 30, "fastblocks info"),
    Step("accuracy", 150, "accuracy harness on cuda/triton"),
    Step("tests", 150, "pytest -m gpu"),
    Step("bench", 120, "op and model benchmarks"),
]


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # "pass", "FAIL", "TIMEOUT", "skipped"
    seconds: float
    headline: str


class Check:
    """Runs the steps; ``dry`` runs them on the CPU (no build, tiny shapes, Triton interpreted)."""

    def __init__(self, out: Path, dry: bool, budget_s: float) -> None:
        self.out, self.dry, self.budget_s = out, dry, budget_s
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "log.txt", "a", buffering=1)  # noqa: SIM115 (closed in finish)
        self.start = time.perf_counter()
        self.device = "cpu" if dry else "cuda"
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.env.setdefault("MAX_JOBS", "16")
        self.env["FASTBLOCKS_CUDA_ARCHS"] = "9.0"
        if dry:
            self.env["TRITON_INTERPRET"] = "1"
        else:
            self.env.pop("TRITON_INTERPRET", None)

    # ------------------------------------------------------------------ plumbing
    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, cmd: list[str], limit_s: float, env: dict | None = None) -> tuple[int | None, str]:
        """Run ``cmd``; append its output to the log and to ``work/<name>.txt``. ``None``: timed out."""
        limit = max(1.0, min(limit_s, self.left()))
        self.log.write(f"\n===== {name}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
        try:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        except OSError as exc:
            rc, text = 127, f"could not start: {exc}"
        else:
            try:
                text, _ = proc.communicate(timeout=limit)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                # SIGINT first: pytest then still prints its summary and writes its junit XML.
                proc.send_signal(signal.SIGINT)
                try:
                    text, _ = proc.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    text, _ = proc.communicate()
                rc, text = None, (text or "") + f"\n[timed out after {limit:.0f} s]"
        self.log.write(text)
        (self.work / f"{name}.txt").open("a").write(text)
        return rc, text

    def py(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # ------------------------------------------------------------------ steps
    def step_env(self, limit: float) -> tuple[bool, str]:
        script = (
            "import json, platform, torch, sys\n"
            "info = {'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': torch.version.cuda,"
            " 'platform': platform.platform()}\n"
            "try:\n    import triton; info['triton'] = triton.__version__\n"
            "except ImportError as e:\n    info['triton'] = f'missing: {e}'\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    info.update(device=p.name, sm=f'{p.major}.{p.minor}', sms=p.multi_processor_count,"
            " memory_gib=round(p.total_memory / 2**30, 1))\n"
            "print(json.dumps(info))\n"
        )
        rc, text = self.run("env", self.py("-c", script), limit)
        for tool in (["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"], ["nvcc", "-V"]):
            if shutil.which(tool[0]):
                self.run("env", tool, 15)
        line = next((ln for ln in text.splitlines() if ln.startswith("{")), "")
        try:
            info = json.loads(line)
        except json.JSONDecodeError:
            return False, "could not read the versions"
        (self.work / "env.json").write_text(json.dumps(info, indent=1))
        head = f"torch {info.get('torch')} (CUDA {info.get('cuda')}), Triton {info.get('triton')}"
        if "device" in info:
            head += f", {info['device']} (sm {info['sm']}, {info['sms']} SMs, {info['memory_gib']} GiB)"
        ok = rc == 0 and (self.dry or "device" in info)
        return ok, head if ok or not line else head + ": no CUDA device"

    def step_build(self, limit: float) -> tuple[bool, str]:
        if self.dry:
            rc, text = self.run("build", self.py("-c", "import fastblocks._C"), limit)
            return rc == 0, "dry run: no build (the extension of this checkout imports)" if rc == 0 else text[-200:]
        for so in ROOT.glob("fastblocks/_C*.so"):
            so.unlink()  # a stale CPU build would shadow the new one
        t0 = time.perf_counter()
        rc, text = self.run("build", self.py("setup.py", "build_ext", "--inplace"), limit)
        took = time.perf_counter() - t0
        if rc != 0:
            err = [ln for ln in text.splitlines() if "error" in ln.lower()][:3]
            return False, f"build failed in {took:.0f} s: {' | '.join(err)[:300]}"
        return True, f"built in {took:.0f} s"

    def step_info(self, limit: float) -> tuple[bool, str]:
        rc, text = self.run("info", self.py("-m", "fastblocks", "info"), limit)
        if rc != 0:
            return False, text.strip().splitlines()[-1][:200] if text.strip() else f"exit {rc}"
        if self.dry:
            return True, "fastblocks info runs"
        check = (
            "from fastblocks import _backend; import fastblocks.ops.batchnorm, fastblocks.ops.add_relu\n"
            "r = {b: _backend.unavailable_reason('batch_norm_act', b, 'cuda') for b in ('cuda', 'triton')}\n"
            "print(r); raise SystemExit(0 if all(v is None for v in r.values()) else 1)\n"
        )
        rc, text = self.run("info", self.py("-c", check), limit)
        return rc == 0, "cuda and triton backends available" if rc == 0 else f"backends: {text.strip()[-200:]}"

    def step_accuracy(self, limit: float) -> tuple[bool, str]:
        out = self.work / "accuracy.json"
        cmd = self.py("-m", "fastblocks.testing.accuracy", "--device", self.device, "--json", str(out))
        if self.dry:
            cmd += ["--backends", "triton", "--cases", "batch_norm_relu,bn_relu_conv3x3,dense_block"]
        else:
            cmd += ["--backends", "cuda,triton", "--models", "resnet18,densenet121"]
        cmd += ["--time-limit", f"{max(10.0, min(limit, self.left()) - 25):.0f}"]
        rc, text = self.run("accuracy", cmd, limit)
        summary = next((ln for ln in reversed(text.splitlines()) if " trials, " in ln and "[" not in ln[:12]), "")
        skipped = text.count("NOT RUN")
        head = summary[:300] + (f"; {skipped} cases NOT RUN (time)" if skipped else "")
        return rc == 0 and not skipped, head or f"exit {rc}"

    def step_tests(self, limit: float) -> tuple[bool, str]:
        env = dict(self.env)
        env["FASTBLOCKS_REQUIRE_BACKENDS"] = "" if self.dry else "cuda,triton"
        junit = self.work / "tests.xml"
        cmd = self.py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}")
        if self.dry:
            cmd.append("--collect-only")
        elif importlib.util.find_spec("xdist") is not None:
            # ~1700 CUDA cases, their time mostly Triton's JIT compiles: 8 workers share the GPU
            # and compile in parallel (the machine has 16 cores).
            cmd += ["-n", "8"]
        rc, text = self.run("tests", cmd, limit, env=env)
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
        if self.dry:  # no CUDA here: `-m gpu` selects nothing (exit 5), which is the expected answer
            return rc in (0, 5), f"dry run: collection works ({last.strip('= ')})"
        return rc == 0, last.strip("= ")[:300]

    def step_bench(self, limit: float) -> tuple[bool, str]:
        common = ["--no-progress", "--no-charts", "--device", self.device] + (["--tiny"] if self.dry else [])
        ops_dir, models_dir = self.work / "bench-ops", self.work / "bench-models"
        half = max(10.0, min(limit, self.left()) / 2)
        rc1, t1 = self.run(
            "bench", self.py("-m", "fastblocks", "bench", "--ops", "--quick", "--output", str(ops_dir), *common), half
        )
        models = ["--models", "resnet50,densenet201", "--providers", "eager,fused", "--modes", "train", "--quick"]
        if not self.dry:
            models += ["--dtype", "bfloat16", "--channels-last"]
        rc2, t2 = self.run(
            "bench", self.py("-m", "fastblocks", "bench", *models, "--output", str(models_dir), *common), half
        )
        heads = []
        for rc, text, what in ((rc1, t1, "ops"), (rc2, t2, "models")):
            line = next((ln for ln in reversed(text.splitlines()) if "measurements in" in ln), "")
            heads.append(f"{what}: {line.strip() or ('timed out' if rc is None else f'exit {rc}')}")
        return rc1 == 0 and rc2 == 0, "; ".join(heads)

    # ------------------------------------------------------------------ driver
    def execute(self, names: list[str]) -> list[Outcome]:
        outcomes = []
        for step in STEPS:
            if step.name not in names:
                continue
            if self.left() < 5:
                outcomes.append(Outcome(step.name, "skipped", 0.0, "no time left in the budget"))
                continue
            t0 = time.perf_counter()
            try:
                ok, head = getattr(self, f"step_{step.name}")(step.limit_s)
                status = "pass" if ok else "FAIL"
            except Exception as exc:  # a bug in one step must not stop the others
                status, head = "FAIL", f"{type(exc).__name__}: {exc}"
            took = time.perf_counter() - t0
            text = (self.work / f"{step.name}.txt").read_text() if (self.work / f"{step.name}.txt").exists() else ""
            if "[timed out after" in text and status == "FAIL":
                status = "TIMEOUT"
            outcomes.append(Outcome(step.name, status, took, head))
            print(f"{step.name:9s} {status:8s} {took:6.1f} s  {head}", flush=True)
        return outcomes

    def finish(self, outcomes: list[Outcome], argv: list[str]) -> None:
        mode = "dry run (CPU)" if self.dry else "GPU"
        lines = [
            f"# gpu_check {mode}: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            "",
            f"command: `{' '.join([Path(sys.executable).name, *argv])}`; commit {self._commit()}; "
            f"total {time.perf_counter() - self.start:.0f} s",
            "",
            "| step | status | s | headline |",
            "|---|---|---|---|",
        ]
        lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.headline.replace('|', '/')} |" for o in outcomes]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        results: dict = {"outcomes": [dataclasses.asdict(o) for o in outcomes]}
        for key, path in (("ops", "bench-ops/ops.json"), ("models", "bench-models/models.json")):
            f = self.work / path
            if f.exists():
                results[key] = json.loads(f.read_text())
        acc = self.work / "accuracy.json"
        if acc.exists():
            data = json.loads(acc.read_text())
            results["accuracy"] = {"summary": data["summary"], "mean_ratios": data["mean_ratios"]}
        env = self.work / "env.json"
        if env.exists():
            results["environment"] = json.loads(env.read_text())
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        self.log.close()
        with tarfile.open(self.out / "gpu_check.tar.gz", "w:gz") as tar:
            tar.add(self.work, arcname="gpu_check")
        shutil.rmtree(self.work)

    @staticmethod
    def _commit() -> str:
        try:
            return (
                subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
                ).stdout.strip()
                or "unknown"
            )
        except OSError:
            return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("outdir", help="folder for summary.md, log.txt, results.json, gpu_check.tar.gz")
    p.add_argument("--dry-run", action="store_true", help="on the CPU: no build, tiny shapes, Triton interpreted")
    p.add_argument("--steps", default=",".join(s.name for s in STEPS), help="comma-separated subset, in order")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for all steps together")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(names) - {s.name for s in STEPS})
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(s.name for s in STEPS)}")
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.dry_run, args.budget_s)
    outcomes = check.execute(names)
    check.finish(outcomes, ["benchmarks/gpu_check.py", *argv])
    bad = [o for o in outcomes if o.status != "pass"]
    print(f"gpu_check: {len(outcomes) - len(bad)} of {len(outcomes)} steps passed; see {out / 'summary.md'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
