"""Entropy shards: the convention, no mixing of rows, exact round trip, restart, parts, refusals."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from blt_dist.config import Config
from blt_dist.data import entropies as ent
from blt_dist.data.entropies import NonFiniteEntropy, compute_entropy_dataset, document_entropies
from blt_dist.data.loader import ENTROPY_FORMAT, Loader, LoaderSpec
from blt_dist.data.prepare import prepare
from blt_dist.data.shards import ByteDataset, SplitReader, iter_stream
from blt_dist.errors import UserError
from blt_dist.model import ModelConfig, build_model
from blt_dist.model.weights import export_info
from blt_dist.training.export import save_export
from blt_dist.vocab import BOS_ID, encode_document
from tests.conftest import write_word_documents

WINDOW = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and the 2 cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_entropy_model(seed: int, n_layers: int = 1) -> tuple[torch.nn.Module, Config]:
    """A random entropy model whose entropies vary (the output head is scaled up: at the
    usual init every distribution is close to uniform and entropies barely differ)."""
    torch.manual_seed(seed)
    cfg = Config()
    cfg.model = ModelConfig(family="entropy", dim=32, n_layers=n_layers, n_heads=2, window=WINDOW)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.output.weight.mul_(4.0)
    return model.eval(), cfg


def random_documents(rng, n: int, max_len: int) -> list[bytes]:
    return [rng.integers(0, 256, int(rng.integers(0, max_len)), dtype=np.uint8).tobytes() for _ in range(n)]


def reference_entropies(model, data: bytes) -> np.ndarray:
    """The definition, spelled out: one forward over the whole document, H_i from logits i-1."""
    ids = torch.from_numpy(encode_document(data))[None]
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids)[0].float(), dim=-1)
    H = np.zeros(ids.shape[1], dtype=np.float32)
    H[1:] = (-(log_p.exp() * log_p).sum(-1))[:-1].numpy()
    return H


# ---------------------------------------------------------------------------------------------
# document_entropies


def test_alone_packed_and_chunked_agree_with_the_definition():
    model, _ = tiny_entropy_model(0)
    rng = np.random.default_rng(1)
    docs = [b"", b"a", b"hello world"] + random_documents(rng, 9, 90) + [rng.bytes(300)]
    expected = [reference_entropies(model, d) for d in docs]

    alone = [document_entropies(model, [d], WINDOW, row_positions=512)[0] for d in docs]
    packed = document_entropies(model, docs, WINDOW, batch_positions=4096, row_positions=512)
    chunked = document_entropies(model, docs, WINDOW, batch_positions=50, row_positions=25)  # 9-position chunks
    as_ids = document_entropies(model, [encode_document(d) for d in docs], WINDOW, batch_positions=64, row_positions=32)
    for k, H in enumerate(expected):
        assert H.shape == (len(docs[k]) + 2,) and H[0] == 0.0
        for name, got in (("alone", alone), ("packed", packed), ("chunked", chunked), ("ids", as_ids)):
            assert got[k].dtype == np.float32
            np.testing.assert_allclose(got[k], H, atol=1e-5, rtol=0, err_msg=f"{name}, document {k}")
    # The test can fail: without doc ids, packed documents read each other.
    assert np.ptp(np.concatenate(expected[3:])) > 0.5


def test_chunks_of_a_deep_model_see_its_whole_receptive_field():
    """Three windowed layers reach 3 * (WINDOW - 1) positions back, not one window: chunks given
    only a window of context would differ from the whole document (and from generation)."""
    model, _ = tiny_entropy_model(0, n_layers=3)
    doc = np.random.default_rng(2).bytes(400)
    expected = reference_entropies(model, doc)
    context = 3 * WINDOW
    chunked = document_entropies(model, [doc], WINDOW, batch_positions=4 * context, row_positions=context + 20)[0]
    np.testing.assert_allclose(chunked, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="receptive field"):
        document_entropies(model, [doc], WINDOW, row_positions=2 * WINDOW)


def test_doc_ids_matter():
    """Control: a packed row that ignored doc ids would differ (so the test above can fail)."""
    model, _ = tiny_entropy_model(0)
    a, b = encode_document(b"first document"), encode_document(b"second one")
    row = torch.from_numpy(np.concatenate([a[:-1], b[:-1]]))[None]
    with torch.no_grad():
        mixed = torch.log_softmax(model(row)[0], -1)  # no doc ids: b's positions see a
    log_p = mixed[a.size - 1 :]
    H_mixed = (-(log_p.exp() * log_p).sum(-1)).numpy()
    H_b = document_entropies(model, [b], WINDOW)[0][1:]
    assert np.abs(H_mixed - H_b).max() > 1e-3


def test_restores_training_mode_and_refuses_nonfinite():
    model, _ = tiny_entropy_model(0)
    model.train()
    document_entropies(model, [b"abc"], WINDOW)
    assert model.training
    with torch.no_grad():
        model.tok_embeddings.weight[ord("z") + 4] = float("nan")  # H after a "z" is NaN
    # Packed, the NaN reaches every piece of the row (0 * NaN); the error still names the
    # first document that is non-finite on its own.
    with pytest.raises(NonFiniteEntropy, match="document 1: non-finite entropy at encoded position"):
        document_entropies(model, [b"abc", b"abz", b"z"], WINDOW)


def test_bf16_pass_is_close_to_fp32():
    """bf16 autocast moves entropies by ~1e-2 nats; rows still never mix (packed == alone)."""
    model, _ = tiny_entropy_model(0)
    rng = np.random.default_rng(2)
    docs = random_documents(rng, 12, 200) + [rng.bytes(700)]
    fp32 = document_entropies(model, docs, WINDOW, row_positions=64, dtype="fp32")
    bf16 = document_entropies(model, docs, WINDOW, row_positions=64, dtype="bf16")
    alone = [document_entropies(model, [d], WINDOW, row_positions=64, dtype="bf16")[0] for d in docs]
    diff = np.abs(np.concatenate(fp32) - np.concatenate(bf16))
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())  # measured 0.005, 0.0008
    for k in range(len(docs)):
        np.testing.assert_allclose(alone[k], bf16[k], atol=0.1, rtol=0)  # rounding differs by row shape
    assert bf16[0].dtype == np.float32 and all(H[0] == 0.0 for H in bf16)


def test_dtype_choice():
    cpu = torch.device("cpu")
    assert ent.resolve_dtype("fp32", cpu) == "fp32" and ent.resolve_dtype("bf16", cpu) == "bf16"
    assert ent.resolve_dtype("auto", cpu) in ("fp32", "bf16")
    with pytest.raises(UserError, match="--dtype: one of auto, fp32, bf16"):
        ent.resolve_dtype("fp16", cpu)


# ---------------------------------------------------------------------------------------------
# The entropy dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("entropies")
    words = ["alpha", "beta", "gamma", "delta", "\xe9t\xe9", "x = 1;"]
    write_word_documents(root / "in", words, 14, (0, 30), tail=lambda i, rng: rng.bytes(i % 3))
    prepare([root / "in"], root / "bytes", val_fraction=0.2, shard_size="700b", progress=False)
    (root / "other_in").mkdir()
    (root / "other_in" / "one.txt").write_bytes(b"a different dataset")
    prepare([root / "other_in"], root / "other_bytes", val_fraction=0.0, progress=False)
    for name, seed in (("model", 0), ("model_b", 1)):
        model, cfg = tiny_entropy_model(seed)
        save_export(model.state_dict(), cfg, root / name)
    compute_entropy_dataset(root / "model", root / "bytes", root / "reference", shard_size="1kb", progress=False,
                            dtype="fp32")
    return root


def run(world: Path, out: Path, **kw):
    """fp32 unless asked: these tests compare stored entropies with the fp32 definition."""
    kw.setdefault("dtype", "fp32")
    return compute_entropy_dataset(world / "model", world / "bytes", out, shard_size="1kb", progress=False, **kw)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_several_input_shards_and_output_shards(world):
    manifest = json.loads((world / "reference" / "dataset.json").read_text())
    byte_manifest = ByteDataset(world / "bytes").manifest
    assert manifest["format"] == ENTROPY_FORMAT
    for split, types in byte_manifest["splits"].items():
        for ctype, stats in types.items():
            mine = manifest["splits"][split][ctype]
            assert (mine["documents"], mine["bytes"], mine["parts"]) == (stats["documents"], stats["bytes"], stats["shards"])
    train_prose = manifest["splits"]["train"]["prose"]
    assert train_prose["parts"] > 1 and train_prose["shards"] > train_prose["parts"]  # the merge has work to do


def test_round_trip_and_manifest(world, tmp_path, monkeypatch):
    computed: list[np.ndarray] = []
    original = ent.document_entropies

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        computed.extend(out)
        return out

    monkeypatch.setattr(ent, "document_entropies", recording)
    result = run(world, tmp_path / "out")
    assert result.manifest is not None and (result.done, result.skipped, result.pending) == (result.done, 0, 0)

    byte_ds, ent_ds = ByteDataset(world / "bytes"), ByteDataset(tmp_path / "out", format=ENTROPY_FORMAT)
    model, _ = tiny_entropy_model(0)
    stored = []
    for byte_stream, ent_stream in zip(byte_ds.streams(), ent_ds.streams(), strict=True):
        assert (byte_stream.split, byte_stream.content_type) == (ent_stream.split, ent_stream.content_type)
        for want, got in zip(iter_stream(byte_stream.path), iter_stream(ent_stream.path), strict=True):
            assert got["data"] == want["data"] and got["doc"] == want["doc"] and got["source"] == want["source"]
            assert got["entropies"].dtype == np.float16 and got["entropies"].shape == (len(got["data"]) + 2,)
            np.testing.assert_allclose(got["entropies"], reference_entropies(model, got["data"]), atol=5e-3)
            stored.append(got["entropies"])
    # float16 exactly as computed (same order: parts in order, documents in order)
    assert len(stored) == len(computed)
    for H16, H in zip(stored, computed):
        assert np.array_equal(H16.view(np.uint16), H.astype(np.float16).view(np.uint16))

    m = ent_ds.manifest
    assert m["byte_fingerprint"] == byte_ds.fingerprint
    assert m["entropy_model"]["weights_sha256"] == export_info(world / "model")["weights_sha256"]
    assert m["entropy_model"]["config"]["window"] == WINDOW
    assert m["fingerprint"] not in (byte_ds.fingerprint, m["entropy_model"]["weights_sha256"])
    assert tree(tmp_path / "out") == tree(world / "reference")  # deterministic

    reader = SplitReader(ent_ds, "train")  # random access through the merged index
    assert reader.get(len(reader) - 1)[1]["entropies"].dtype == np.float16


def test_restart_after_a_crash_gives_identical_output(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    original = ent.document_entropies

    def crash_in_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(ent, "document_entropies", crash_in_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(world, out)
    monkeypatch.setattr(ent, "document_entropies", original)
    assert not (out / "dataset.json").exists()
    assert len(list(out.rglob("part.json"))) == 1
    # a hard kill leaves a half-written part under its temp name: it must be discarded
    stale = out / "val" / "code" / ".part.00000.tmp"
    stale.mkdir(parents=True)
    (stale / "shard.00000.mds").write_bytes(b"garbage")

    result = run(world, out)
    assert result.skipped == 1 and result.done == len(ent.list_shards(ByteDataset(world / "bytes"))) - 1
    assert result.manifest is not None
    assert tree(out) == tree(world / "reference")


def test_parts_give_the_same_dataset_as_one_run(world, tmp_path):
    out = tmp_path / "out"
    first = run(world, out, part=(0, 2))
    assert first.manifest is None and first.pending > 0 and not (out / "dataset.json").exists()
    with pytest.raises(UserError, match="no dataset.json|not a blt-dist byte dataset"):
        ByteDataset(out, format=ENTROPY_FORMAT)
    second = run(world, out, part=(1, 2))
    assert second.manifest is not None and second.skipped == 0
    assert first.done + second.done == len(ent.list_shards(ByteDataset(world / "bytes")))
    assert tree(out) == tree(world / "reference")
    again = run(world, out, part=(1, 2))  # a requeued task finds its work done and re-merges the same
    assert (again.done, again.skipped) == (0, second.done) and tree(out) == tree(world / "reference")


def test_workers_give_the_same_dataset_as_one_process(world, tmp_path):
    """Two spawned worker processes share the shards (largest first): the same bytes as one
    process, and a rerun finds every part done."""
    out = tmp_path / "out"
    result = run(world, out, workers=2)
    assert result.manifest is not None and result.done == len(ent.list_shards(ByteDataset(world / "bytes")))
    assert result.documents == sum(1 for s in ByteDataset(world / "bytes").streams() for _ in iter_stream(s.path))
    assert tree(out) == tree(world / "reference")
    again = run(world, out, workers=2)
    assert (again.done, again.skipped) == (0, result.done) and tree(out) == tree(world / "reference")


def test_device_and_workers_are_checked(world, tmp_path):
    with pytest.raises(UserError, match="--workers must be at least 1"):
        run(world, tmp_path / "a", workers=0)
    with pytest.raises(UserError, match="--device: one of auto, cpu, cuda"):
        run(world, tmp_path / "b", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA device here"):
            run(world, tmp_path / "c", device="cuda")
    assert ent.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pass_matches_cpu(world, tmp_path):
    """The pass on CUDA, fp32 (torch leaves TF32 matmuls off by default), in two worker processes,
    stores the CPU reference's entropies to float16 rounding."""
    run(world, tmp_path / "gpu", device="cuda", workers=2)
    cpu = ByteDataset(world / "reference", format=ENTROPY_FORMAT)
    gpu = ByteDataset(tmp_path / "gpu", format=ENTROPY_FORMAT)
    for a, b in zip(cpu.streams(), gpu.streams(), strict=True):
        for x, y in zip(iter_stream(a.path), iter_stream(b.path), strict=True):
            assert x["data"] == y["data"]
            np.testing.assert_allclose(x["entropies"].astype(np.float32), y["entropies"].astype(np.float32), atol=2e-3)


def test_mismatched_inputs_are_refused(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "reference", out)
    with pytest.raises(UserError, match="holds entropies of byte dataset .* entropy model weights .*--force"):
        compute_entropy_dataset(world / "model_b", world / "bytes", out, progress=False)
    with pytest.raises(UserError, match="holds entropies of byte dataset"):
        compute_entropy_dataset(world / "model", world / "other_bytes", out, progress=False)
    # an unfinished run (job.json and some parts, no dataset.json) is checked as well
    (out / "dataset.json").unlink()
    with pytest.raises(UserError, match="holds entropies of"):
        compute_entropy_dataset(world / "model_b", world / "bytes", out, progress=False)

    result = compute_entropy_dataset(world / "model_b", world / "bytes", out, force=True, shard_size="1kb", progress=False)
    assert result.skipped == 0 and result.manifest is not None
    assert result.manifest["entropy_model"]["weights_sha256"] == export_info(world / "model_b")["weights_sha256"]
    assert tree(out) != tree(world / "reference")

    with pytest.raises(UserError, match="format 'blt-dist/byte-shards/v1', not entropies"):
        compute_entropy_dataset(world / "model", world / "other_bytes", world / "bytes", force=True, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other data"):
        compute_entropy_dataset(world / "model", world / "bytes", tmp_path / "busy", force=True, progress=False)
    with pytest.raises(UserError, match="--part 2/2"):
        compute_entropy_dataset(world / "model", world / "bytes", tmp_path / "x", part=(2, 2), progress=False)


def test_only_entropy_models_and_finite_entropies(world, tmp_path):
    cfg = Config()
    cfg.model = ModelConfig(family="bpe", vocab_size=64, dim=32, n_layers=1, n_heads=2)
    save_export(build_model(cfg.model).state_dict(), cfg, tmp_path / "bpe")
    with pytest.raises(UserError, match="a 'bpe' model export, not an entropy model"):
        compute_entropy_dataset(tmp_path / "bpe", world / "bytes", tmp_path / "out", progress=False)

    model, cfg = tiny_entropy_model(0)
    state = model.state_dict()
    state["output.weight"][7] = float("nan")
    save_export(state, cfg, tmp_path / "broken")
    with pytest.raises(UserError, match=r"train/code document 0 \(.*00\.txt\): .*non-finite entropy at encoded position 1"):
        compute_entropy_dataset(tmp_path / "broken", world / "bytes", tmp_path / "out2", progress=False)
    assert not list((tmp_path / "out2").rglob("part.json"))  # nothing published


def test_weights_must_match_their_export_record(world, tmp_path):
    shutil.copytree(world / "model", tmp_path / "model")
    shutil.copy(world / "model_b" / "model.safetensors", tmp_path / "model" / "model.safetensors")
    with pytest.raises(UserError, match="sha256 differs from the one in export.json"):
        compute_entropy_dataset(tmp_path / "model", world / "bytes", tmp_path / "out", progress=False)


def test_blt_loader_reads_entropy_shards(world):
    patching = dict(mode="entropy", threshold=4.0, threshold_r=None, patch_size=4, max_patch_length=8)
    spec = LoaderSpec(
        path=str(world / "reference"), split="train", family="blt", sample_len=64, micro_batch_size=2,
        patches_per_sample=16, patching=patching,
    )
    loader = Loader(spec)
    batch = next(loader)
    assert batch["tokens"].shape == (2, 64)
    assert loader.fingerprint == json.loads((world / "reference" / "dataset.json").read_text())["fingerprint"]
    assert (batch["tokens"] == BOS_ID).any()


def test_cli(world, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    ent.add_arguments(parser)
    common = ["--model", str(world / "model"), "--data", str(world / "bytes"), "--out", str(tmp_path / "out"), "--no-progress",
              "--dtype", "fp32"]
    assert ent.run(parser.parse_args(common + ["--part", "1/2"])) == 0
    assert "shards of other parts not complete yet" in capsys.readouterr().out
    assert ent.run(parser.parse_args(common + ["--part", "0/2", "--batch-positions", "256"])) == 0
    out = capsys.readouterr().out
    assert "bytes/s" in out and "complete" in out and "0 already complete" in out
    with pytest.raises(SystemExit):
        parser.parse_args(common + ["--part", "3/2"])


def test_compute_dtype_is_recorded_and_parts_do_not_mix_dtypes(world, tmp_path):
    assert json.loads((world / "reference" / "dataset.json").read_text())["compute_dtype"] == "fp32"
    out = tmp_path / "out"
    run(world, out, part=(0, 2), dtype="bf16")
    assert json.loads((out / "job.json").read_text())["compute_dtype"] == "bf16"
    with pytest.raises(UserError, match="computed in bf16; this run has .* computed in fp32"):
        run(world, out, part=(1, 2), dtype="fp32")
    result = run(world, out, part=(1, 2), dtype="bf16")
    assert result.dtype == "bf16" and result.manifest["compute_dtype"] == "bf16"


def test_entropy_source_check_names_both_models(world):
    ent.check_entropy_source(world / "reference", world / "model")
    with pytest.raises(UserError, match="come from entropy model .* but .*model_b"):
        ent.check_entropy_source(world / "reference", world / "model_b")
    # a byte dataset (a BLT's held-out data.val) holds no entropies: the model computes them
    ent.check_entropy_source(world / "bytes", world / "model_b")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eval_patches_as_the_training_shards(world, tmp_path, dtype):
    """`blt-dist eval` recomputes a BLT's entropies in the dtype its training entropies record,
    and cuts the same patches as the training shards do, document by document."""
    from blt_dist.config import PatchingConfig
    from blt_dist.evaluation.evaluate import Encoder

    shards = tmp_path / "entropies"
    run(world, shards, dtype=dtype)
    stored = {bytes(s["data"]): s["entropies"] for _, s in ByteDataset(shards, format=ENTROPY_FORMAT).documents("train")}
    threshold = float(np.median(np.concatenate(list(stored.values()))))  # many decisions near the threshold
    cfg = Config()
    cfg.model = ModelConfig(family="blt")
    cfg.data.train, cfg.data.entropy_model = str(shards), str(world / "model")
    cfg.data.patching = PatchingConfig(mode="entropy", threshold=threshold, max_patch_length=8)
    encoder = Encoder(cfg, None, None)
    assert (encoder.entropy_dtype, encoder.entropy_dtype_source) == (dtype, f"as recorded by {shards}")
    decisions = 0
    for data, entropies in stored.items():
        _, _, trained = encoder.patcher.encode({"data": data, "entropies": entropies}, -1)
        _, _, evaluated = encoder.encode(data)
        assert np.array_equal(evaluated, trained), data
        decisions += len(trained)
    assert decisions > 500 and len(stored) > 20
    assert Encoder(cfg, None, None, entropy_dtype="fp32").entropy_dtype == "fp32"  # --entropy-dtype wins
