"""Checkpoint tools across layouts, with real gloo ranks.

One 4-rank launch (tests/distributed/convert_probe.py) converts random tiny transformers ``GlmForCausalLM``
checkpoints at several layouts and computes logits there; this test compares them with transformers'
(an independent implementation):

* 4 heads / 2 groups at TP1 and TP2; 8 heads / 2 groups at PP2, TP2 x PP2 and TP4 (more TP ranks than KV
  groups: megatron-core replicates K/V); 6 heads / 3 groups at PP2; a 255-token vocabulary at TP2 (padded to
  256 in megaglm, trimmed again on export);
* the same HF checkpoint written at different layouts (incl. PP2 x VPP2) holds identical global tensors;
* export from a TP2 x PP2 checkpoint is bit-exact with the source;
* reshard TP2 x PP2 (trained one step, with Adam state) -> TP1 x PP1 x DP4 -> TP2 x PP1 x DP2 is bit-exact
  for weights and optimizer state, and keeps iteration, consumed samples and scheduler state;

and the command-line path: ``megaglm-ckpt convert hf-to-megaglm --tensor-model-parallel-size 2`` (its own
spawned ranks), then ``megaglm-train ... checkpoint.load_dir=<converted> checkpoint.load_optimizer=false``
starts from exactly the converted weights.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_convert import assert_parity, glm_config, glm_state, random_glm, read_safetensors_dir, save_glm  # noqa: E402

from tests.distributed.harness import REPO, common_overrides, launch, plain_tensors  # noqa: E402

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")

# name -> (HF model, TP, PP, VPP, compare logits)
CASES = {
    "a_tp1": ("a", 1, 1, None, True),
    "a_tp2": ("a", 2, 1, None, True),
    "c_pp2": ("c", 1, 2, None, True),
    "c_tp2pp2": ("c", 2, 2, None, True),
    "c_tp4": ("c", 4, 1, None, True),
    "c_pp2vpp2": ("c", 1, 2, 2, False),
    "e_pp2": ("e", 1, 2, None, True),
    "v_tp2": ("v", 2, 1, None, True),
}
MODELS = {  # name -> glm_config kwargs
    "a": dict(heads=4, groups=2, head_dim=16, hidden=64, layers=2, vocab=256),
    "c": dict(heads=8, groups=2, head_dim=8, hidden=64, layers=4, vocab=256, theta=1e6),
    "e": dict(heads=6, groups=3, head_dim=8, hidden=48, layers=2, vocab=192, ffn=96),
    "v": dict(heads=4, groups=2, head_dim=16, hidden=64, layers=2, vocab=255),
}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_layouts")
    hf, models = {}, {}
    for i, (name, kw) in enumerate(MODELS.items()):
        models[name] = random_glm(glm_config(**kw), seed=10 + i)
        hf[name] = save_glm(models[name], root / f"hf_{name}")
        torch.save(torch.randint(0, kw["vocab"], (2, 32), generator=torch.Generator().manual_seed(i)),
                   root / f"tokens_{name}.pt")
    spec = {"parity": [], "reshard": {
        "from": str(root / "c_tp2pp2"), "src": str(root / "rs_src"), "r1": str(root / "rs_tp1"),
        "r2": str(root / "rs_tp2"), "tokens": str(root / "tokens_c.pt"), "dist_opt": False},
        "reshard_dist": {
            "from": str(root / "c_tp2pp2"), "src": str(root / "rsd_src"), "r1": str(root / "rsd_tp1"),
            "r2": str(root / "rsd_tp2"), "tokens": str(root / "tokens_c.pt"), "dist_opt": True}}
    for case, (m, tp, pp, vpp, logits) in CASES.items():
        spec["parity"].append({"name": case, "hf": str(hf[m]), "out": str(root / case), "tp": tp, "pp": pp,
                               "vpp": vpp, "tokens": str(root / f"tokens_{m}.pt"),
                               "logits": str(root / f"logits_{case}.pt") if logits else None})
    (root / "spec.json").write_text(json.dumps(spec))
    launch(4, [], module="tests.distributed.convert_probe", env={"CONVERT_PROBE_SPEC": str(root / "spec.json")})
    return {"root": root, "hf": hf, "models": models}


def test_parity_with_transformers_at_every_layout(probe):
    root = probe["root"]
    diffs = {}
    for case, (m, _tp, _pp, _vpp, logits) in CASES.items():
        if not logits:
            continue
        tokens = torch.load(root / f"tokens_{m}.pt")
        with torch.no_grad():
            ref = probe["models"][m](input_ids=tokens).logits
        ours = torch.load(root / f"logits_{case}.pt")
        assert ours.shape[:2] == ref.shape[:2]
        if m == "v":
            assert ours.shape[-1] == 256 and ref.shape[-1] == 255  # padded for TP2, compared on the real ids
        diffs[case] = assert_parity(ours, ref, case)
    print("parity (max|diff| / max|ref|):", json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))


def test_layouts_hold_the_same_tensors_and_export_is_exact(probe, tmp_path):
    from megaglm.convert.inspect import inspect_checkpoint
    from megaglm.convert.megaglm_to_hf import megaglm_to_hf

    root = probe["root"]
    for group in (("a_tp1", "a_tp2"), ("c_pp2", "c_tp2pp2", "c_tp4", "c_pp2vpp2")):
        ref = plain_tensors(root / group[0] / "iter_0000000")
        for other in group[1:]:
            got = plain_tensors(root / other / "iter_0000000")
            assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), other
    for case, (_, tp, pp, vpp, _) in CASES.items():
        layout = inspect_checkpoint(root / case)["layout"]
        assert (layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"],
                layout["virtual_pipeline_model_parallel_size"]) == (tp, pp, vpp or 1), case
    # export from TP2 x PP2 and from the padded-vocabulary TP2 checkpoint: bit-exact with the sources
    for case, m in (("c_tp2pp2", "c"), ("v_tp2", "v")):
        megaglm_to_hf(root / case, tmp_path / case, "glm")
        back, src = read_safetensors_dir(tmp_path / case), glm_state(probe["models"][m])
        assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src), case
    emb = {t["name"]: t for t in inspect_checkpoint(root / "v_tp2")["tensors"]}["embedding.word_embeddings.weight"]
    assert emb["shape"] == [256, 64]


@pytest.mark.parametrize("prefix", ["rs", "rsd"])  # Adam state of torch's Adam / of the distributed optimizer
def test_reshard_round_trip_is_bit_exact(probe, prefix):
    from megatron.core import dist_checkpointing

    from megaglm.convert.inspect import inspect_checkpoint

    root = probe["root"]
    it = "iter_0000001"
    dirs = (f"{prefix}_src", f"{prefix}_tp1", f"{prefix}_tp2")
    src, r1, r2 = (plain_tensors(root / d / it) for d in dirs)
    opt_keys = [k for k in src if k.startswith("optimizer.")]
    assert len(opt_keys) >= 20, sorted(src)[:5]  # Adam moments (+ fp32 params) per parameter
    init = plain_tensors(root / "c_tp2pp2" / "iter_0000000")
    assert any(not torch.equal(src[k], init[k]) for k in init)  # the step changed the weights
    assert any(src[k].abs().sum() > 0 for k in opt_keys if "exp_avg" in k)
    for name, other in (("TP1xPP1xDP4", r1), ("TP2xPP1xDP2", r2)):
        assert set(other) == set(src), name
        bad = [k for k in src if not torch.equal(other[k], src[k])]
        assert not bad, f"{name}: {bad[:5]}"
    layouts = [inspect_checkpoint(root / d)["layout"] for d in dirs]
    assert [(x["tensor_model_parallel_size"], x["pipeline_model_parallel_size"], x["data_parallel_size"])
            for x in layouts] == [(2, 2, 1), (1, 1, 4), (2, 1, 2)]
    commons = []
    import torch.distributed as dist

    from megaglm.parallel.init import find_free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    try:
        for d in dirs:
            commons.append(dist_checkpointing.load_common_state_dict(str(root / d / it)))
    finally:
        dist.destroy_process_group()
    for c in commons[1:]:
        assert c["iteration"] == commons[0]["iteration"] == 1
        assert c["consumed_train_samples"] == commons[0]["consumed_train_samples"] == 2
        assert c["opt_param_scheduler"] == commons[0]["opt_param_scheduler"]
    lineage = inspect_checkpoint(root / dirs[2])["lineage"]
    assert [e["op"] for e in lineage][-2:] == ["reshard", "reshard"]


def test_cli_convert_then_megaglm_train_starts_from_it(text_dataset, tmp_path):
    """The spawned-ranks CLI path, and a training run that starts from the converted weights."""
    model = random_glm(glm_config(heads=4, groups=2, head_dim=8, hidden=32, layers=1, vocab=100352, ffn=64), seed=3)
    hf = save_glm(model, tmp_path / "hf")
    out = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "megaglm.convert.cli", "convert", "hf-to-megaglm", "--input",
                           str(hf), "--output", str(out), "--tensor-model-parallel-size", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "train from it with: megaglm-train" in proc.stdout
    overrides = proc.stdout.split("megaglm-train ", 1)[1].split()
    model_overrides = [o for o in overrides if o.startswith("model")]
    run = tmp_path / "run"
    launch(1, common_overrides(text_dataset, run, **{"train.train_iters": 0}) + model_overrides
           + [f"checkpoint.load_dir={out}", "checkpoint.load_optimizer=false"])
    converted = plain_tensors(out / "iter_0000000")
    started = plain_tensors(run / "checkpoints" / "iter_0000000")
    started = {k: v for k, v in started.items() if not k.startswith("optimizer.")}
    assert set(started) == set(converted) and all(torch.equal(started[k], converted[k]) for k in converted)
