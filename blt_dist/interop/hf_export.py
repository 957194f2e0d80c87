"""`blt-dist export RUN --hf OUT`: a run (or a project export) as a transformers directory that
`AutoModelForCausalLM.from_pretrained(OUT)` loads with no custom code.

bpe and byte runs become LlamaForCausalLM (plus, for bpe, the run's sentencepiece model as a
LlamaTokenizer; for byte runs a byte-level fast tokenizer over the project's byte ids). A BLT in
the meta layout with BOS-alone entropy patching becomes BltForCausalLM with its entropy model as
the BltPatcher and the threshold in its config (interop/hf_blt.py; the byte tokenizer too). A run HF cannot express exactly is refused with every difference listed: an
approximate export would score differently from the run it claims to be.
Without --hf this is the project's own export (training/export.py), unchanged.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blt_dist.config import Config, load_config
from blt_dist.data.entropies import entropy_dtype_for
from blt_dist.interop import InteropError, hf_blt, hf_llama
from blt_dist.model.weights import WEIGHTS
from blt_dist.training import checkpoint
from blt_dist.training import export as project_export
from blt_dist.vocab import BOS_ID, DELIM_ID, EOS_ID, OFFSET, PAD_ID

# What BltForCausalLM (transformers 4.57) computes differently from a BLT of this project, by the
# config switch that decides it (see issue 20 for the measurements). `model.layout=meta` removes the
# first four, data.patching.bos_alone=true the first-patch one; the rest have no switch in HF.
HASH_DIFFERENCE = ("hash n-grams: HF/Meta hash raw ids by sum_j x[i-n+1+j]*1000000007**j (int64); this run hashes "
                   "(x+1)*1000003**k mod 2**31-1 (model.hash.function=meta)")
RESIDUAL_DIFFERENCE = "cross-attention residual: HF/Meta add it twice (q + (q + attn)) (model.double_residual=true)"
LATENT_NORM_DIFFERENCE = ("latent_norm: HF/Meta have no norm before the latent-to-decoder projection "
                          "(model.latent_norm=false)")
PROJECTION_DIFFERENCE = ("encoder-to-latent projection: HF drops it when cross_attn_k * encoder.dim == dim "
                         "(model.encoder_projection=null with model.layout=meta)")
BOS_ALONE_DIFFERENCE = ("first patch: HF forces BOS alone in the first patch and reads the previous patch by a "
                        "one-patch lag, which is the project's latest-completed-patch rule only then "
                        "(data.patching.bos_alone=true)")
BLT_DIFFERENCES = (HASH_DIFFERENCE, RESIDUAL_DIFFERENCE, LATENT_NORM_DIFFERENCE, PROJECTION_DIFFERENCE,
                   BOS_ALONE_DIFFERENCE)
# What an exact BLT export still cannot promise, printed with it (HF's patcher; see interop/hf_blt.py).
BLT_EXPORT_LIMITS = (
    "HF's patcher attends over the whole input: patches (and logits) equal this run's for inputs of at most "
    "{window} ids (BOS included), the entropy model's window",
    "with max_patch_length={max_len} HF drops zero-length patches, so the LAST input position reads the previous "
    "patch when its byte closes a patch (every earlier position is exact); pass patch_lengths with a trailing 0 "
    "to get it exactly",
)


def blt_differences(cfg: Config, entropy: Config | None) -> list[str]:
    m, p = cfg.model, cfg.data.patching
    found = []
    if m.hash_function != "meta":
        found.append(HASH_DIFFERENCE)
    if not m.uses_double_residual:
        found.append(RESIDUAL_DIFFERENCE)
    if m.uses_latent_norm:
        found.append(LATENT_NORM_DIFFERENCE)
    if m.uses_encoder_projection != (m.cross_attn_k * m.encoder.dim != m.dim):
        found.append(PROJECTION_DIFFERENCE)
    if not p.bos_alone:
        found.append(BOS_ALONE_DIFFERENCE)
    for name, window in (("encoder", m.encoder.window), ("decoder", m.decoder.window), ("latent", m.window)):
        if window is not None:
            found.append(f"{name} window {window}: HF attends causally over the whole input")
    if m.encoder.n_layers == 0:
        found.append("encoder.n_layers=0: HF pools after the last encoder layer, so it needs one")
    if p.mode != "entropy":
        found.append(f"patching mode {p.mode!r}: HF's patcher cuts by a global entropy threshold only")
    elif p.threshold is None:
        found.append("data.patching.threshold is not set")
    if p.mode == "entropy" and entropy is None:
        found.append("no entropy model (data.entropy_model or --entropy-model): it becomes HF's BltPatcher")
    if entropy is not None:
        dtype, source = entropy_dtype_for(cfg)
        if dtype != "fp32":
            found.append(f"entropies in {dtype} ({source}): HF's patcher computes them in the model's dtype, fp32")
    return found


def differences(cfg: Config, entropy: Config | None = None) -> list[str]:
    m = cfg.model
    if m.family == "blt":
        return blt_differences(cfg, entropy)
    if m.family == "entropy":
        return [f"family 'entropy' (sliding window {m.attention_window}): it ships inside a BLT's patcher, "
                "not as a standalone LlamaForCausalLM"]
    return hf_llama.differences(m)


def write_hf(state: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path, entropy_model: str | None = None) -> Path:
    """Writes config.json + model.safetensors (+ tokenizer) into out_dir; raises InteropError
    naming every difference when HF cannot express the model exactly. A BLT takes its entropy
    model from `entropy_model` (an export directory) or the run's data.entropy_model."""
    entropy_state, entropy_cfg = None, None
    entropy_model = entropy_model or (cfg.data.entropy_model if cfg.model.family == "blt" else None)
    if entropy_model and cfg.model.family == "blt":
        if not (Path(entropy_model) / WEIGHTS).is_file():
            raise InteropError(f"{entropy_model}: entropy model export not found (give --entropy-model)")
        entropy_state, entropy_cfg = load_file(str(Path(entropy_model) / WEIGHTS)), load_config(
            Path(entropy_model) / "config.yaml")
        if entropy_cfg.model.family != "entropy":
            raise InteropError(f"{entropy_model}: a {entropy_cfg.model.family!r} export, not an entropy model")
    found = differences(cfg, entropy_cfg)
    if found:
        raise InteropError(f"cannot export a {cfg.model.family} run to transformers exactly: " + "; ".join(found))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.family == "blt":
        hf_state = {**hf_blt.to_hf_blt_state(state, cfg.model), **hf_blt.patcher_state(entropy_state, entropy_cfg.model)}
        config = hf_blt.hf_blt_config_dict(cfg.model, entropy_cfg.model, cfg.data.patching)
    else:
        hf_state, config = hf_llama.to_hf_state(state, cfg.model), hf_llama.hf_config_dict(cfg.model)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in hf_state.items()}
    # transformers reads the "format" metadata to know these are torch tensors.
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n")
    if cfg.model.family == "bpe" and cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file():
        write_bpe_tokenizer(Path(cfg.data.tokenizer), out_dir)
    elif cfg.model.family in ("byte", "blt"):
        write_byte_tokenizer(out_dir)
    return out_dir


def export_limits(cfg: Config, entropy_model: str | None = None) -> list[str]:
    """What the export of this BLT leaves inexact (HF's patcher), for the command's output."""
    if cfg.model.family != "blt":
        return []
    window = load_config(Path(entropy_model or cfg.data.entropy_model) / "config.yaml").model.attention_window
    limits = [BLT_EXPORT_LIMITS[0].format(window=window)] if window is not None else []
    return limits + [BLT_EXPORT_LIMITS[1].format(max_len=cfg.data.patching.max_patch_length)]


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_byte_tokenizer(out_dir: Path) -> None:
    """A fast tokenizer (tokenizer.json, no custom code) over the project's byte ids: byte b -> b + 4,
    BOS (1) prepended, EOS 2, PAD 0. It takes text, so it encodes valid UTF-8 only; invalid bytes
    go to the model as ids directly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # lazy: ~0.3 s, --hf byte runs only

    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<delim>": DELIM_ID}
    vocab.update({char: b + OFFSET for b, char in gpt2_byte_chars().items()})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one id per byte
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>", "<delim>"])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
    }, indent=2) + "\n")


def write_bpe_tokenizer(model_file: Path, out_dir: Path) -> None:
    """The run's sentencepiece model as a LlamaTokenizer (slow, sentencepiece-backed: it encodes
    as the project does, no conversion to a fast tokenizer)."""
    shutil.copyfile(model_file, out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sp_model_kwargs": {},
    }, indent=2) + "\n")


def read_state(source: Path, step: int | None) -> tuple[dict[str, torch.Tensor], Config]:
    """A project export directory, or a run directory's checkpoint (newest complete by default)."""
    if (source / WEIGHTS).is_file() and (source / "config.yaml").is_file() and step is None:
        return load_file(str(source / WEIGHTS)), load_config(source / "config.yaml")
    if not (source / "config.yaml").is_file():
        raise InteropError(f"{source}: not a run directory or model export (no config.yaml)")
    found = checkpoint.newest_complete(source) if step is None else (
        checkpoint.checkpoint_root(source) / checkpoint.tag_for(step),)
    if found is None:
        raise InteropError(f"{source}: no complete checkpoint to export")
    return checkpoint.consolidated_state_dict(found[0]), load_config(source / "config.yaml")


def add_arguments(parser) -> None:
    project_export.add_arguments(parser)
    parser.add_argument("--hf", default=None, metavar="OUT",
                        help="write a transformers directory instead (LlamaForCausalLM for bpe/byte runs, "
                             "BltForCausalLM with its patcher for meta-layout BLTs; RUN_DIR may also be a model export)")
    parser.add_argument("--entropy-model", default=None, metavar="EXPORT_DIR",
                        help="BLT: the entropy model export that becomes HF's patcher (default: data.entropy_model)")


def run(args) -> int:
    if args.hf is None:
        return project_export.run(args)
    state, cfg = read_state(Path(args.run_dir), args.step)
    out = write_hf(state, cfg, args.hf, args.entropy_model)
    arch = hf_blt.HF_BLT_ARCHITECTURE if cfg.model.family == "blt" else hf_llama.HF_ARCHITECTURE
    print(f"{args.run_dir} -> {out} ({arch})")
    for limit in export_limits(cfg, args.entropy_model):
        print(f"  note: {limit}")
    return 0
