"""A real small decoder LM, trained from scratch on the Python standard library's own sources.

The stdlib ships with every interpreter (``sysconfig.get_paths()["stdlib"]``), so the corpus
needs no download. The model is the zoo's Llama (models/llama.py) with tied embeddings; this
module holds the presets, the corpus and its split by file, perplexity, and loading a trained
checkpoint directory:

    DIR/model.safetensors   the weights (safetensors; the tied LM head is stored once)
    DIR/tokenizer.json      the byte-level BPE (``tokenizers``), trained on the train files
    DIR/config.json         the LlamaConfig, the preset, the split and the measured metrics

Training itself is in models/train_lm.py; compiling a checkpoint is `meshweave lm-eval`
(meshweave/cli_lm.py). This module imports only torch: ``tokenizers`` and ``safetensors`` are
the optional extra ``meshweave[lm]`` and are imported when needed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .llama import Llama, LlamaConfig

EOS = "<|endoftext|>"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class LMPreset:
    """What one `meshweave train-lm --preset NAME` trains, and for how long."""

    name: str
    model: LlamaConfig
    seq_len: int
    batch: int
    steps: int
    lr: float
    max_files: int | None  # None: every stdlib file
    max_seconds: float  # wall-clock cap on the optimizer loop
    eval_windows: int = 64
    description: str = ""


def _cfg(vocab: int, hidden: int, layers: int, heads: int, kv: int, ffn: int, seq: int):
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv, ffn_hidden_size=ffn, max_seq_len=seq * 4,
                       rope_theta=10000.0, tie_embeddings=True)


# Every linear's K (hidden, ffn) is a multiple of 128, so int4/int3 g128 quantization has real
# groups. One core a step (torch eager, AdamW): tiny ~0.04 s, draft ~0.23 s, small ~0.63 s, so
# small's 660 s cap plus ~2 min of BPE, encoding and evaluation over the whole stdlib stays
# within 15 minutes on 2 cores. draft and small train the same BPE on the same files (the
# trainer is deterministic), so draft can serve as small's speculative-decoding draft.
PRESETS: dict[str, LMPreset] = {
    "tiny": LMPreset("tiny", _cfg(512, 128, 2, 4, 2, 256, 64), 64, 8, 600, 3e-3, 48, 60.0,
                     eval_windows=256, description="seconds: tests and quant_accuracy.py"),
    "draft": LMPreset("draft", _cfg(2048, 128, 2, 4, 2, 384, 128), 128, 16, 1200, 2e-3,
                      None, 300.0, description="the small model's draft (5 minutes)"),
    "small": LMPreset("small", _cfg(2048, 256, 4, 8, 2, 512, 128), 128, 16, 1000, 3e-3,
                      None, 660.0, description="the real small model (<= 15 min, 2 cores)"),
}


class LMError(ValueError):
    """Bad input to train-lm or to loading a checkpoint directory."""


def get_preset(name: str) -> LMPreset:
    if name not in PRESETS:
        raise LMError(f"unknown --preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(max_files: int | None = None) -> list[str]:
    """The stdlib's .py files (no site-packages), sorted, so the corpus is the same each run;
    `max_files` takes evenly spaced ones (different packages, not the first folder)."""
    root = stdlib_root()
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and os.path.getsize(f) > 0)
    if not files:
        raise LMError(f"no .py files under the stdlib directory {root}")
    if max_files is not None:
        step = max(1, len(files) // max_files)
        files = files[::step][:max_files]
    return files


def is_validation(path: str) -> bool:
    """One file in ten, by a hash of its path relative to the stdlib: a split by file, stable
    across machines and Python patch versions, so no validation text leaks into training."""
    rel = os.path.relpath(path, stdlib_root())
    return hashlib.sha1(rel.encode()).digest()[0] % 10 == 0


def split_files(files: list[str]) -> tuple[list[str], list[str]]:
    """(train, validation) files; disjoint by construction."""
    train = [f for f in files if not is_validation(f)]
    val = [f for f in files if is_validation(f)]
    if not val:  # a handful of files may hash none to validation: hold out the last one
        train, val = train[:-1], train[-1:]
    if not train:
        raise LMError(f"the corpus of {len(files)} files leaves no training file")
    return train, val


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def encode_texts(tok, texts: list[str]) -> torch.Tensor:
    """All texts' tokens as one int64 stream, EOS after each text."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def windows(stream: torch.Tensor, seq: int, starts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inputs [n, seq] and next-token targets [n, seq] starting at `starts`."""
    idx = starts[:, None] + torch.arange(seq + 1)[None, :]
    chunk = stream[idx]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def perplexity(forward: Callable[[torch.Tensor], torch.Tensor], stream: torch.Tensor, seq: int,
               batch: int, max_windows: int) -> tuple[float, int]:
    """exp(mean next-token loss) of `forward` (ids [batch, seq] -> logits) over non-overlapping
    windows of `stream`, evenly spaced when there are more than `max_windows`. Every call has
    exactly `batch` rows, so a compiled model with a static shape can be measured. Returns
    (perplexity, number of tokens scored)."""
    avail = (len(stream) - 1) // seq
    n = min(avail, max_windows) // batch * batch
    if n == 0:
        raise LMError(f"a stream of {len(stream)} tokens holds fewer than batch={batch} windows "
                      f"of {seq} tokens")
    starts = torch.linspace(0, avail - 1, n).round().long() * seq
    total = 0.0
    for i in range(0, n, batch):
        x, y = windows(stream, seq, starts[i:i + batch])
        logits = forward(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                 reduction="sum").item()
    return math.exp(total / (n * seq)), n * seq


@dataclass
class TrainedLM:
    """A loaded checkpoint: the eager model (eval mode, fp32), its tokenizer and config.json."""

    model: Llama
    tokenizer: object  # tokenizers.Tokenizer
    meta: dict
    directory: str

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def files(self, split: str) -> list[str]:
        """The training or validation files of this checkpoint, as paths on this machine."""
        if split not in ("train", "validation"):
            raise LMError(f"split {split!r}: expected 'train' or 'validation'")
        return [os.path.join(stdlib_root(), rel) for rel in self.meta["corpus"][split]]

    def token_stream(self, split: str, max_files: int | None = None) -> torch.Tensor:
        files = self.files(split)[:max_files]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise LMError(f"{self.directory}: {len(missing)} {split} files of its corpus are "
                          f"not on this machine, e.g. {missing[0]} (another Python version?)")
        return encode_texts(self.tokenizer, [read_text(f) for f in files])

    def calibration_batches(self, count: int, batch: int = 8, seq: int | None = None,
                            split: str = "train", seed: int = 1) -> list[tuple[torch.Tensor]]:
        """`count` argument tuples (ids [batch, seq],) of random windows of real text from
        `split`: GPTQ calibration batches (draw those from "train", never "validation")."""
        seq = seq or self.seq_len
        stream = self.token_stream(split, max_files=max(8, 4 * count))
        if len(stream) <= seq + 1:
            raise LMError(f"{self.directory}: the {split} text has {len(stream)} tokens, fewer "
                          f"than one window of {seq}")
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(stream) - seq - 1, (count, batch), generator=gen)
        return [(windows(stream, seq, row)[0],) for row in starts]

    def example_inputs(self, batch: int = 2, seq: int | None = None, split: str = "train",
                       seed: int = 0) -> tuple[torch.Tensor]:
        """(ids [batch, seq],) of real text: example args for meshweave.compile(lm.model, ...)."""
        return self.calibration_batches(1, batch, seq, split, seed)[0]


def save_checkpoint(directory: str, model: Llama, tokenizer, meta: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight" or not model.config.tie_embeddings}
    save_file(state, os.path.join(directory, "model.safetensors"))
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    meta = dict(meta, model_config=dataclasses.asdict(model.config))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise LMError(f"{path} is not valid JSON ({e}): expected the config.json written by "
                      f"`meshweave train-lm`") from None
    need = ("model_config", "corpus", "seq_len", "preset")
    lacking = [k for k in need if not isinstance(meta, dict) or k not in meta]
    if lacking:
        raise LMError(f"{path} lacks {', '.join(lacking)}: expected the config.json written by "
                      f"`meshweave train-lm`")
    return meta


def _build_model(directory: str, meta: dict) -> Llama:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        model = Llama(LlamaConfig(**meta["model_config"]))
    except (TypeError, ValueError) as e:
        raise LMError(f"{directory}/config.json: model_config is not a LlamaConfig: {e}") from None
    try:
        state = load_file(os.path.join(directory, "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, RuntimeError) as e:
        msg = str(e).replace("\n", " ").replace("\t", "")
        raise LMError(f"{directory}/model.safetensors does not match its config.json: "
                      f"{msg}") from None
    bad = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if bad or unexpected:
        raise LMError(f"{directory}/model.safetensors does not match its config.json: missing "
                      f"{bad}, unexpected {unexpected}")
    return model.eval()


def load_checkpoint(directory: str) -> TrainedLM:
    """The model (eval mode, fp32), tokenizer and metadata saved by `meshweave train-lm`."""
    if not os.path.isdir(directory):
        raise LMError(f"checkpoint directory {directory!r} does not exist: expected the --out "
                      f"of `meshweave train-lm`")
    missing = [n for n in CHECKPOINT_FILES if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise LMError(f"checkpoint directory {directory!r} lacks {', '.join(missing)}: expected "
                      f"the output of `meshweave train-lm --out {directory}`")
    from tokenizers import Tokenizer

    meta = _read_meta(directory)
    model = _build_model(directory, meta)
    try:
        tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    except Exception as e:  # noqa: BLE001  tokenizers raises a bare Exception on a bad file
        raise LMError(f"{directory}/tokenizer.json is not a tokenizers file: {e}") from None
    if tok.get_vocab_size() != model.config.vocab_size:
        raise LMError(f"{directory}: tokenizer.json has {tok.get_vocab_size()} tokens and the "
                      f"model {model.config.vocab_size}: they come from different runs")
    return TrainedLM(model, tok, meta, directory)
