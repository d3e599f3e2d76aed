"""The small LM trained on the stdlib's sources: training, checkpoints, the CLI, compile, GPTQ.

One tiny model is trained once per module (a short run: seconds) and shared by the tests.
The full-length comparison of GPTQ and RTN perplexity is `-m heavy`; the default run checks
the same claim on layer outputs and compiled logits of the short-trained model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from meshweave.models.small_lm import (
    LMError,
    get_preset,
    is_validation,
    load_checkpoint,
    perplexity,
    stdlib_root,
)
from meshweave.models.train_lm import train_lm
from meshweave.passes.quant.gptq import HessianAccumulator, gptq
from meshweave.passes.quant.quantizer import rtn

import meshweave
from meshweave.cli_lm import compile_checkpoint

SHORT_STEPS = 120  # ~5 s on one core: enough for the loss to fall well below the untrained one


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.strip().splitlines()
            if ln.strip() and "Warning" not in ln and "warn" not in ln]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_lm"))
    return train_lm("tiny", out, steps=SHORT_STEPS, log=lambda s: None)


def test_training_lowers_the_validation_loss(trained):
    m = trained.meta
    assert m["steps"] == SHORT_STEPS and m["preset"] == "tiny"
    # untrained: ~vocab (512); a model that learned nothing stays above ~300 (unigram level)
    assert m["initial_val_ppl"] > 400, m
    assert m["val_ppl"] < 0.5 * m["initial_val_ppl"], m
    assert m["val_tokens_scored"] >= 8 * get_preset("tiny").seq_len


def test_checkpoint_round_trips_exactly(trained):
    lm = load_checkpoint(trained.directory)
    assert lm.model.lm_head.weight is lm.model.embed.weight  # tied after loading too
    x = lm.example_inputs(batch=3, split="validation", seed=5)[0]
    with torch.no_grad():
        assert torch.equal(lm.model(x), trained.model(x))
    stream = lm.token_stream("validation")
    ppl, _ = perplexity(lm.model, stream, lm.seq_len, trained.meta["batch"],
                        get_preset("tiny").eval_windows)
    assert ppl == pytest.approx(trained.meta["val_ppl"], rel=1e-6)
    assert lm.encode("def f():\n    return 1\n") and lm.decode(lm.encode("x = 1")) == "x = 1"


def test_validation_files_are_disjoint_from_training(trained):
    corpus = trained.meta["corpus"]
    train, val = set(corpus["train"]), set(corpus["validation"])
    assert train and val and not train & val
    assert all(is_validation(os.path.join(stdlib_root(), f)) for f in val)
    assert not any(is_validation(os.path.join(stdlib_root(), f)) for f in train)
    assert len(val) * 4 < len(train)  # about one in ten


def test_compiled_trained_model_matches_eager(trained):
    lm = load_checkpoint(trained.directory)
    cm, _ = compile_checkpoint(lm, batch=2)
    x = lm.example_inputs(batch=2, split="validation", seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(cm(x), lm.model(x), rtol=1e-4, atol=1e-4)


def test_cli_train_lm_prints_the_perplexity_line(tmp_path):
    out = tmp_path / "ckpt"
    r = run_cli("train-lm", "--preset", "tiny", "--out", str(out), "--steps", "20", "--seed", "1")
    assert r.returncode == 0, r.stderr
    m = re.search(r"^validation perplexity: ([0-9.]+) \((\d+) tokens, (\d+) files held out\)$",
                  r.stdout, re.MULTILINE)
    assert m, r.stdout
    assert re.search(r"step 20/20 loss [0-9.]+ [0-9,]+ tokens/s", r.stdout), r.stdout
    assert f"checkpoint: {out}" in r.stdout
    meta = json.loads((out / "config.json").read_text())
    assert float(m.group(1)) == pytest.approx(meta["val_ppl"], rel=1e-3)
    assert int(m.group(3)) == len(meta["corpus"]["validation"])
    assert meta["steps"] == 20 and meta["seed"] == 1


def test_cli_lm_eval_compiles_the_checkpoint(trained):
    r = run_cli("lm-eval", "--checkpoint", trained.directory, "--windows", "32")
    assert r.returncode == 0, r.stderr
    err = float(r.stdout.split("max |meshweave (fp32) - eager fp32| = ")[1].split()[0])
    assert err < 1e-4
    assert re.search(r"eager fp32 ([0-9.]+), meshweave fp32 \1 ", r.stdout), r.stdout


@pytest.mark.parametrize("args, message", [
    (("lm-eval", "--checkpoint", "/nonexistent/ckpt"), "'/nonexistent/ckpt' does not exist"),
    (("train-lm", "--preset", "huge", "--out", "/tmp/x"), "unknown --preset 'huge'"),
])
def test_cli_bad_input_is_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = _error_lines(r)
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_bad_checkpoints_are_clear_errors(trained, tmp_path):
    def copy(name: str) -> str:
        d = tmp_path / name
        shutil.copytree(trained.directory, d)
        return str(d)

    with pytest.raises(LMError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing"))
    d = copy("no_weights")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(LMError, match="lacks model.safetensors"):
        load_checkpoint(d)
    d = copy("bad_json")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{"preset": "tiny", ')
    with pytest.raises(LMError, match=r"config.json is not valid JSON"):
        load_checkpoint(d)
    r = run_cli("lm-eval", "--checkpoint", d)
    assert r.returncode == 2 and "config.json is not valid JSON" in _error_lines(r)[0]
    d = copy("mismatch")
    with open(os.path.join(d, "config.json")) as f:
        meta = json.load(f)
    meta["model_config"]["hidden_size"] = 256
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(LMError, match="model.safetensors does not match its config.json"):
        load_checkpoint(d)
    with pytest.raises(LMError, match="unknown --preset 'huge'"):
        get_preset("huge")
    with pytest.raises(LMError, match="--max-seconds 0: expected a positive"):
        train_lm("tiny", str(tmp_path / "never"), max_seconds=0)
    assert not (tmp_path / "never").exists()


def _linear_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Every nn.Linear's input rows over `batches`, by module name."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [mod.register_forward_hook(
        lambda m, a, o, name=name: seen.setdefault(name, []).append(a[0].flatten(0, -2)))
        for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for (x,) in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def _dequant(codes, scales, zeros):
    n, k = codes.shape
    g = k // scales.shape[1]
    return ((codes.view(n, k // g, g) - zeros[..., None]) * scales[..., None]).view(n, k)


@pytest.mark.parametrize("group", [128, None])
def test_gptq_beats_rtn_on_trained_layer_outputs_at_3_bits(trained, group):
    """Each linear of the trained model, on its calibration activations (training text):
    ||X W^T - X Q(W)^T||^2 with GPTQ's Q against round to nearest."""
    lm = trained
    acts = _linear_inputs(lm.model, lm.calibration_batches(8, batch=8, split="train", seed=1))
    modules = dict(lm.model.named_modules())
    err = {"rtn": 0.0, "gptq": 0.0}
    wins = 0
    for name, x in acts.items():
        w = modules[name].weight.detach()
        k = w.shape[1]
        g = k if group is None else min(group, k)
        acc = HessianAccumulator(k)
        acc.add(x)
        e_rtn = float(((x @ (w - _dequant(*rtn(w, 3, g, False))).T) ** 2).sum())
        e_gptq = float(((x @ (w - _dequant(*gptq(w, acc.h, 3, g, False))).T) ** 2).sum())
        err["rtn"] += e_rtn
        err["gptq"] += e_gptq
        wins += e_gptq < e_rtn
    assert len(acts) == 15  # 7 linears x 2 layers + the (tied) LM head
    assert err["gptq"] < 0.8 * err["rtn"], err
    assert wins >= len(acts) - 1, (wins, len(acts))


def test_compiled_gptq_logits_closer_than_rtn_at_3_bits(trained):
    """End to end through meshweave.compile: logits on validation text (never calibrated on)."""
    lm = trained
    x = lm.example_inputs(batch=8, split="validation", seed=2)[0]
    with torch.no_grad():
        ref = lm.model(x)
    mse = {}
    for method in ("rtn", "gptq"):
        cfg = meshweave.QuantConfig(bits=3, group_size=128, method=method)
        cm, _ = compile_checkpoint(lm, quantize=cfg, calibration=8)
        assert cm.graph.op_counts().get("quant.linear") == 15
        with torch.no_grad():
            mse[method] = float((cm(x) - ref).pow(2).mean())
    assert mse["gptq"] < 0.8 * mse["rtn"], mse


@pytest.mark.heavy
def test_gptq_beats_rtn_on_perplexity_of_the_full_tiny_model(tmp_path):
    """The preset's full run (600 steps, ~30 s), then held-out perplexity of the compiled
    int3 models: GPTQ below RTN at g128 and per channel, and int8 within 1% of fp32."""
    lm = train_lm("tiny", str(tmp_path), log=lambda s: None)
    stream = lm.token_stream("validation")
    fp32, _ = perplexity(lm.model, stream, lm.seq_len, 8, 1024)
    ppl = {}
    for bits, group, method in [(8, None, "rtn"), (3, 128, "rtn"), (3, 128, "gptq"),
                                (3, None, "rtn"), (3, None, "gptq")]:
        cfg = meshweave.QuantConfig(bits=bits, group_size=group, method=method)
        cm, _ = compile_checkpoint(lm, quantize=cfg, calibration=16)
        ppl[(bits, group, method)] = perplexity(cm, stream, lm.seq_len, 8, 1024)[0]
    assert ppl[(8, None, "rtn")] == pytest.approx(fp32, rel=0.01), ppl
    for group in (128, None):
        assert ppl[(3, group, "gptq")] < ppl[(3, group, "rtn")], (fp32, ppl)
