"""`blt-dist compare`: the report on two small runs, the statistics and tie rule, bad input.

The runs are built directly (randomly initialised tiny BLT and BPE saved with save_export, plus a
metrics.jsonl of the trainer's shape) so the tests take seconds; tests/test_train.py covers
how `blt-dist train` writes the same files.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from blt_dist.cli import main as cli_main
from blt_dist.config import load_config, save_resolved
from blt_dist.data.prepare import prepare
from blt_dist.data.tokenizer import train_tokenizer
from blt_dist.errors import UserError
from blt_dist.evaluation import compare as cmp
from blt_dist.evaluation import plots
from blt_dist.model import build_model
from blt_dist.training.export import save_export
from tests.conftest import write_word_documents

WORDS = "the quick brown fox jumps over a lazy dog while bytes and patches flow through latent space".split()
BUDGET = 1e9
PLOTS = ("bpb_vs_flops.png", "training_curves.png", "bpb_by_content_type.png", "patch_sizes.png", "noise_gap.png")


def make_run(run_dir: Path, config: str, overrides: list[str], seed: int = 0,
             flops_per_step: float = BUDGET / 3) -> Path:
    """A finished run as the trainer leaves it: config.yaml, metrics.jsonl, export/."""
    cfg = load_config(config, [*overrides, f"run.dir={run_dir}", f"run.seed={seed}", f"train.flops={BUDGET}",
                               "train.max_steps=0"])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    save_resolved(cfg, run_dir)
    save_export(model.state_dict(), cfg, run_dir / "export", {"step": 3})
    records = []
    for step in (1, 2, 3):
        record = {"step": step, "total_steps": 3, "loss": 6.0 - step, "bpb": 8.0 - step, "lr": 1e-3,
                  "bytes_seen": 1000 * step, "flops_seen": flops_per_step * step}
        if cfg.model.family == "blt":
            record["mean_patch_size"] = 3.0 + step / 10
        records.append(record)
    records.append({"step": 3, "val_bpb": 5.5, "val_loss": 3.8, "val_bytes": 900})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    write_word_documents(root / "in", WORDS, 40, (5, 60))
    prepare([root / "in"], root / "ds", val_fraction=0.2, progress=False)
    train_tokenizer(root / "ds", root / "tok.model", vocab_size=300)
    write_word_documents(root / "in2", WORDS, 6, (5, 30), seed=1)
    prepare([root / "in2"], root / "other", val_fraction=0.5, progress=False)
    data = [f"data.train={root / 'ds'}", f"data.val={root / 'ds'}"]
    blt = data + ["data.patching.mode=space", "data.byte_capacity=128", "data.patches_per_sample=48"]
    bpe = data + [f"data.tokenizer={root / 'tok.model'}", "model.vocab_size=300", "data.tokens_per_sample=32"]
    runs = root / "runs"
    make_run(runs / "blt", "configs/blt/tiny.yaml", blt)
    make_run(runs / "bpe", "configs/bpe/tiny.yaml", bpe, flops_per_step=1.02 * BUDGET / 3)
    return SimpleNamespace(root=root, runs=runs, blt=blt, bpe=bpe)


def test_report_on_two_runs_with_noise_plots_and_cache(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    status = cli_main(["compare", str(setup.runs), "--out", str(out), "--noise", "swap:0.1", "--eval-bytes", "3000"])
    assert status == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert report.strip() in printed
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000, name
        assert f"]({name})" in report
    for needle in ("## Runs", "## Bits per byte, clean", "## Bits per byte, noised `swap:0.1`", "## Who wins",
                   "### BLT vs BPE, 1e+09 training FLOPs", "*gzip -9*", "*bz2 -9*", "*xz -9e*",
                   "## Against the compressors", "## Training compute",
                   "Every pair compared at one budget is within 5% in useful training FLOPs per byte",
                   "Clean-to-noised gap `swap:0.1`", "## Scaling", "## Patch statistics",
                   "No entropies (the run does not patch by entropy, or its record predates the bands): blt "
                   "(patching: space)"):
        assert needle in report, needle
    table = [line for line in report.splitlines() if line.startswith("| blt |")]
    assert table and "| blt | blt | - | 0 |" in table[0]
    # every held-out document is Latin: the script table's one row is the overall clean bpb
    script_rows = [line for line in report.split("## Bits per byte by script")[1].splitlines()
                   if line.startswith("| Latin |")]
    overall = {line.split(" | ")[0][2:]: line.split(" | ")[-1].split(" ± ")[0]
               for line in report.split("## Bits per byte, clean")[1].split("##")[0].splitlines()
               if line.startswith(("| blt |", "| bpe |"))}
    assert len(script_rows) == 1
    # the patch table: one row per content type, length shares summing to 100%, no entropy bands
    patch_rows = [line.strip("| ").split(" | ") for line in report.split("## Patch statistics")[1].splitlines()
                  if line.startswith("| blt |")]
    assert sorted(r[1] for r in patch_rows) == ["code", "prose"]
    for r in patch_rows:
        assert sum(float(c.rstrip("%")) for c in r[3:7]) == pytest.approx(100, abs=0.2) and r[7:] == ["-"] * 3
    cells = script_rows[0].strip("| ").split(" | ")
    assert cells[2:4] == [overall["blt"], overall["bpe"]]
    worse = [family for family in ("blt", "bpe") if float(overall[family]) > 8.0]  # untrained models
    assert worse and cells[-1] == ", ".join(worse)

    # the rerun reads every score from the cache: evaluating anything again would fail
    def no_eval(*args, **kwargs):
        raise AssertionError("scored again despite the cache")

    monkeypatch.setattr("blt_dist.evaluation.compare.evaluate_model", no_eval)
    monkeypatch.setattr("blt_dist.evaluation.compare.compressor_bpb", no_eval)
    assert cli_main(["compare", str(setup.runs), "--out", str(out), "--noise", "swap:0.1", "--eval-bytes", "3000"]) == 0
    assert (out / "report.md").read_text() == report


def test_every_run_is_scored_on_the_same_bytes(setup, tmp_path):
    runs, _ = cmp.find_runs([setup.runs])
    heldout = cmp.resolve_heldout(runs, None, 2000)
    assert heldout.path == str(setup.root / "ds")
    records = {r.name: cmp.evaluate_run(r, heldout) for r in runs}
    cmp.check_comparable(records)
    docs = {name: [d[:3] for d in rec["per_document"]] for name, rec in records.items()}
    assert docs["blt"] == docs["bpe"] and len(docs["blt"]) >= 2
    blt = records["blt"]["by_content_type"]
    assert set(blt) == {"code", "prose"} and all(t["patches"] > 0 and t["mean_patch_size"] > 1 for t in blt.values())
    # the sum of the histogram's patch lengths covers every encoded position: bytes + BOS + EOS
    for t in blt.values():
        lengths = np.arange(len(t["patch_length_histogram"]))
        assert (lengths * t["patch_length_histogram"]).sum() == t["bytes"] + 2 * t["documents"]


def test_sweep_directory_gives_sizes_and_budgets(setup, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with open(sweep / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "family", "size", "seed", "flop_budget", "status", "run_dir"])
        writer.writeheader()
        for name in ("blt", "bpe"):
            writer.writerow({"run": name, "family": name, "size": "tiny", "seed": 0, "flop_budget": BUDGET,
                             "status": "finished", "run_dir": str(setup.runs / name)})
        writer.writerow({"run": "bpe-late", "family": "bpe", "size": "tiny", "seed": 1, "flop_budget": BUDGET,
                         "status": "queued", "run_dir": str(sweep / "bpe-late")})
    runs, skipped = cmp.find_runs([sweep])
    assert [(r.name, r.size, r.budget) for r in runs] == [("blt", "tiny", BUDGET), ("bpe", "tiny", BUDGET)]
    assert len(skipped) == 1 and "bpe-late: no config.yaml, no metrics.jsonl, no export/" in skipped[0]


def _fake_row(family: str, record: dict, seed: int = 0, budget: float = BUDGET, metrics: list[dict] = ()):
    cfg = SimpleNamespace(model=SimpleNamespace(family=family), run=SimpleNamespace(seed=seed),
                          train=SimpleNamespace(flops=budget))
    return cmp.Row(cmp.Run(f"{family}{seed}", Path(f"/x/{family}{seed}"), cfg, list(metrics)), record)


def _record(bits: list[float], nbytes: list[int], types=None) -> dict:
    types = types or ["prose"] * len(bits)
    return {"identity": {"noise": None}, "per_document": [[t, f"d{i}", n, b * math.log(2)]
                                                           for i, (t, n, b) in enumerate(zip(types, nbytes, bits))],
            "bpb": sum(bits) / sum(nbytes)}


def test_ratio_estimator_standard_error_by_hand():
    e = cmp.ratio_estimate(_record([1.0, 2.0, 3.0], [1, 1, 2]))
    assert e.value == 1.5
    # z = (bits - 1.5 bytes) / 4 = (-0.125, 0.125, 0); SE^2 = 3/2 * sum z^2
    assert e.se == pytest.approx(math.sqrt(1.5 * 2 * 0.125 ** 2))
    assert cmp.ratio_estimate(_record([1.0], [4])).se == math.inf  # one document: unknown, never a win


def test_too_few_documents_are_not_called():
    few = cmp.comparisons([_fake_row("blt", _record([1.0, 1.1, 1.2], [1, 1, 1])),
                           _fake_row("bpe", _record([5.0, 6.0, 7.0], [1, 1, 1]))], ["prose"], [])
    assert all(c["winner"] == "n/a" and c["documents"] == 3 for c in few)
    assert "not called on prose (3 documents)" in cmp._verdict_sentence(few[:1], "clean")


def test_identical_runs_tie_and_a_clear_difference_wins():
    rng = np.random.default_rng(0)
    nbytes = rng.integers(100, 1000, 40).tolist()
    bits = (np.array(nbytes) * rng.uniform(2.0, 3.0, 40)).tolist()
    record = _record(bits, nbytes)
    same = cmp.comparisons([_fake_row("blt", record), _fake_row("bpe", record)], ["prose"], [])
    assert same and all(c["winner"] == "tie" and c["difference"] == 0 for c in same)
    better = _record([b * 0.9 for b in bits], nbytes)
    found = cmp.comparisons([_fake_row("blt", better), _fake_row("bpe", record)], ["prose"], [])
    assert all(c["winner"] == "blt" for c in found)
    # +-5% per document, alternating: no shift beyond what the documents' spread explains, a tie
    jitter = _record([b * (1.05 if i % 2 else 0.95) for i, b in enumerate(bits)], nbytes)
    assert all(c["winner"] == "tie" for c in cmp.comparisons([_fake_row("blt", jitter), _fake_row("bpe", record)],
                                                             ["prose"], []))
    # different budgets are not compared head to head
    assert cmp.comparisons([_fake_row("blt", better), _fake_row("bpe", record, budget=3 * BUDGET)], ["prose"], []) == []


def test_pairs_whose_per_byte_cost_differs_are_flagged():
    record = _record([1.0] * 5, [1] * 5)

    def row(family, flops, executed, budget=BUDGET):
        metrics = [{"step": 9, "loss": 1.0, "bytes_seen": 1000, "flops_seen": flops, "flops_executed_seen": executed}]
        return _fake_row(family, record, budget=budget, metrics=metrics)

    blt, bpe = row("blt", BUDGET, 1.25 * BUDGET), row("bpe", 1.59 * BUDGET, 1.59 * BUDGET)
    assert blt.run.flops_per_byte == BUDGET / 1000 and blt.run.flops_executed == 1.25 * BUDGET
    flags = cmp.per_byte_cost_flags([blt, bpe])
    assert len(flags) == 1 and "bpe0 costs 1.59x blt0's FLOPs per byte" in flags[0]
    assert cmp.per_byte_cost_flags([blt, row("bpe", 1.04 * BUDGET, 1.04 * BUDGET)]) == []  # within 5%
    assert cmp.per_byte_cost_flags([blt, row("bpe", 1.59 * BUDGET, 0, budget=5 * BUDGET)]) == []  # not compared
    report = "\n".join(cmp._compute([blt, bpe]))
    assert "**Per-byte cost differs by more than 5%**" in report
    assert "| blt0 | blt | 1e+09 | 1e+09 | 1.25e+09 | 20.0% | 1K | 1M | 1.25M |" in report


def test_seed_spread_widens_the_uncertainty():
    nbytes = [500] * 20
    base = [1000.0 + 10 * i for i in range(20)]
    lo, hi = _record([b * 0.97 for b in base], nbytes), _record([b * 1.01 for b in base], nbytes)
    ref = _record(base, nbytes)
    one_seed = cmp.comparisons([_fake_row("blt", lo), _fake_row("bpe", ref)], ["prose"], [])
    assert one_seed[0]["winner"] == "blt"  # a clean 3% everywhere: outside the document SE
    seeds = cmp.comparisons([_fake_row("blt", lo, 0), _fake_row("blt", hi, 1), _fake_row("bpe", ref)], ["prose"], [])
    assert seeds[0]["seeds"] == (2, 1) and seeds[0]["winner"] == "tie"  # seeds disagree by 4%: inside the spread


def test_mismatched_heldout_sets_are_refused(setup, tmp_path):
    other = [f"data.train={setup.root / 'other'}", f"data.val={setup.root / 'other'}",
             "data.patching.mode=space", "data.byte_capacity=128", "data.patches_per_sample=48"]
    make_run(tmp_path / "runs" / "blt-other", "configs/blt/tiny.yaml", other)
    runs, _ = cmp.find_runs([setup.runs, tmp_path / "runs"])
    with pytest.raises(UserError, match="validated on different held-out sets.*pass --heldout"):
        cmp.resolve_heldout(runs, None, 2000)
    # records of different byte limits (or held-out fingerprints) are never averaged
    blt = next(r for r in runs if r.name == "blt")
    heldout = cmp.resolve_heldout([blt], None, 2000)
    a = cmp.evaluate_run(blt, heldout)
    b = cmp.evaluate_run(blt, cmp.Heldout(heldout.path, heldout.fingerprint, 1000))
    with pytest.raises(UserError, match="different held-out sets"):
        cmp.check_comparable({"a": a, "b": b})


def test_no_finished_runs_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["compare", str(tmp_path)]) == 1
    assert "no finished runs to compare" in capsys.readouterr().err
    unfinished = tmp_path / "runs" / "blt"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("model: {family: blt}\n")
    (unfinished / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match=r"blt: no export/ \(unfinished\?\)"):
        cmp.find_runs([tmp_path / "runs"])
    with pytest.raises(UserError, match="no such directory"):
        cmp.find_runs([tmp_path / "nope"])


def test_compressors_only(setup, tmp_path, capsys):
    out = tmp_path / "c"
    assert cli_main(["compare", "--compressors-only", "--heldout", str(setup.root / "ds"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "*xz -9e*" in printed and "*gzip -9*" in printed and "## Who wins" not in printed
    assert cli_main(["compare", "--compressors-only"]) == 1


def _rendered(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _tick_labels_do_not_overlap(fig, axis):
    renderer = _rendered(fig)
    boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels(which="both")
             if t.get_visible() and t.get_text()]
    assert len(boxes) >= 2
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


COMPRESSORS = {"gzip -9": {"bpb": 2.6}, "bz2 -9": {"bpb": 2.2}, "xz -9e": {"bpb": 2.23}}  # bz2 and xz close


def _texts_do_not_overlap(fig, ax):
    renderer = _rendered(fig)
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_bpb_vs_flops_at_one_budget_is_a_labelled_point_chart():
    """The demo's case: two runs whose budgets differ by 0.3% are one budget, not a 0.5%-wide log axis."""
    fig = plots.bpb_vs_flops_figure({"BLT": [(4.0e12, 1.9, 0.02)], "BPE": [(4.012e12, 1.8, 0.02)],
                                     "BYTE": [(3.99e12, 2.4, 0.03)]}, COMPRESSORS)
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear" and [t.get_text() for t in ax.get_xticklabels()] == ["BLT", "BPE", "BYTE"]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 2.6  # bars start at zero; compressors inside
    assert {t.get_text() for t in ax.texts} == set(COMPRESSORS)  # named on the plot
    _texts_do_not_overlap(fig, ax)
    _tick_labels_do_not_overlap(fig, ax.xaxis)
    _tick_labels_do_not_overlap(fig, ax.yaxis)


def test_bpb_vs_flops_across_budgets_spans_decades_with_fits():
    from blt_dist.evaluation.scaling import fit_family

    budgets = [1e12, 2e12, 4e12, 8e12, 1.6e13]
    points = {"BLT p4.5": [(b, 3.0 * (b / 1e12) ** -0.1, 0.01) for b in budgets],
              "BLT p8": [(b, 3.1 * (b / 1e12) ** -0.12, 0.01) for b in budgets],
              "BPE": [(b, 2.8 * (b / 1e12) ** -0.07, 0.01) for b in budgets],
              "BYTE": [(1e12, 3.5, 0.02), (2e12, 3.3, 0.02)]}  # two budgets: points, no line
    fits = {k: fit_family([(x, y) for x, y, _ in v])[0] for k, v in points.items()}
    assert fits["BYTE"] is None and fits["BPE"].exponent == pytest.approx(-0.07)
    fig = plots.bpb_vs_flops_figure(points, COMPRESSORS, fits)
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    for low, high in (ax.get_xlim(), ax.get_ylim()):
        assert high / low >= 10 - 1e-9
    assert ax.get_xlim()[0] < 1e12 and ax.get_xlim()[1] > 1.6e13
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["BLT p4.5 (exponent -0.100)", "BLT p8 (exponent -0.120)", "BPE (exponent -0.070)", "BYTE"]
    handles = ax.get_legend().legend_handles
    assert len({str(h.get_color()) for h in handles}) == 4  # two BLT patch sizes, told apart
    fitted = [line for line in ax.get_lines() if len(line.get_xdata()) == 50]
    assert len(fitted) == 3  # no line through BYTE's two budgets
    assert {t.get_text() for t in ax.texts} == set(COMPRESSORS)
    _texts_do_not_overlap(fig, ax)
    _tick_labels_do_not_overlap(fig, ax.xaxis)
    _tick_labels_do_not_overlap(fig, ax.yaxis)

    # a narrow range of budgets still gets a decade, centred on the data
    narrow = plots.bpb_vs_flops_figure({"BPE": [(1e12, 2.0, 0.0), (1.5e12, 1.9, 0.0)]}, COMPRESSORS).axes[0]
    low, high = narrow.get_xlim()
    assert high / low == pytest.approx(10) and low < 1e12 < 1.5e12 < high


def _scaling_row(family: str, budget: float, bpb: float, seed: int = 0, patch: float = 4.5, inference: float = 1e6,
                 layout: str = "project"):
    cfg = SimpleNamespace(model=SimpleNamespace(family=family, layout=layout), run=SimpleNamespace(seed=seed),
                          train=SimpleNamespace(flops=budget),
                          data=SimpleNamespace(patching=SimpleNamespace(target_mean_size=patch)))
    metrics = [{"step": 1, "loss": 1.0, "bytes_seen": 1000, "flops_seen": budget}]
    name = f"{family}-p{patch:g}-{layout}-{budget:.0e}-s{seed}"
    row = cmp.Row(cmp.Run(name, Path("/x") / name, cfg, metrics, "tiny", budget), _record([bpb * 100] * 8, [100] * 8))
    row.inference_flops_per_byte = inference
    return row


def test_scaling_section_fits_crosses_and_groups():
    budgets = [1e12, 2e12, 4e12, 8e12, 1.6e13]
    rows = []
    for b in budgets:  # BLT p8 starts worse and improves faster: the lines cross inside the budgets
        rows.append(_scaling_row("blt", b, 3.0 * (b / 1e12) ** -0.12, patch=8, inference=1.0e6))
        rows.append(_scaling_row("blt", b, 2.9 * (b / 1e12) ** -0.10, patch=4.5, inference=1.01e6))
        rows.append(_scaling_row("bpe", b, 2.8 * (b / 1e12) ** -0.07, inference=0.99e6))
    for seed, wobble in ((1, 1.01), (2, 0.99)):  # seeds at the smallest budget give the crossing a range
        rows.append(_scaling_row("bpe", 1e12, 2.8 * wobble, seed=seed, inference=0.99e6))
    rows += [_scaling_row("byte", 1e12, 3.5, inference=3e6), _scaling_row("byte", 2e12, 3.3, inference=3e6)]
    text = "\n".join(cmp._scaling(rows))
    assert "| BLT p8 | 5 | 5 | -0.1200 |" in text and "| BLT p4.5 | 5 | 5 | -0.1000 |" in text
    assert "| BPE | 5 | 7 |" in text
    assert "| BYTE | 2 | 2 | - | - | not fitted: 2 budget(s), a trend needs at least 3 |" in text
    crossings = text.split("Crossings: ")[1].split("\n")[0]
    # BLT p8 vs BPE: 3.0 x^-0.12 = 2.8 x^-0.07 at x = (3.0/2.8)^(1/0.05) = 3.97 (in units of 1e12)
    assert "BLT p8 and BPE cross at 3.97e+12 training FLOPs (seed bootstrap 16-84%:" in crossings
    assert "within the fitted budgets" in crossings and "BYTE" not in crossings
    groups = text.split("### Runs by inference FLOPs/byte")[1]
    # BLT p8, BLT p4.5 and BPE are within 10% in inference cost: one group per budget; BYTE its own
    assert groups.count("| 990K | 1e+12 | ") == 1 and "BPE 2.800 (3 seeds)" in groups
    assert "| 3M | 1e+12 | BYTE 3.500 |" in groups


def test_blt_runs_of_two_layouts_are_two_series():
    budgets = [1e12, 2e12, 4e12]
    rows = [_scaling_row("blt", b, 3.0 * (b / 1e12) ** -0.10, layout="project") for b in budgets]
    rows += [_scaling_row("blt", b, 2.9 * (b / 1e12) ** -0.12, layout="meta") for b in budgets]
    rows += [_scaling_row("bpe", b, 2.8 * (b / 1e12) ** -0.07) for b in budgets]
    assert set(plots.scaling_points(rows)) == {"BLT project", "BLT meta", "BPE"}
    text = "\n".join(cmp._scaling(rows))
    assert "| BLT project | 3 | 3 | -0.1000 |" in text and "| BLT meta | 3 | 3 | -0.1200 |" in text
    # one layout (and one patch size) among the runs: the plain family name, as before
    assert set(plots.scaling_points([r for r in rows if r.run.cfg.model.layout != "meta"])) == {"BLT", "BPE"}


def test_scaling_section_at_one_budget_fits_nothing():
    rows = [_scaling_row("blt", 4e12, 1.9), _scaling_row("bpe", 4.01e12, 1.8)]
    text = "\n".join(cmp._scaling(rows))
    assert text.count("not fitted: 1 budget(s)") == 2
    assert "Crossings: none computed (fewer than two fitted series)." in text


def test_compare_on_a_sweep_of_three_budgets_fits_and_draws(setup, tmp_path):
    """End to end on real (untrained) runs listed in a sweep's results.csv at 3 budgets: the
    report fits each family, and the plot is log-log with a fitted line per family."""
    from matplotlib.image import imread

    sweep = tmp_path / "sweep"
    rows = []
    for family, config, overrides in (("blt", "configs/blt/tiny.yaml", setup.blt),
                                      ("bpe", "configs/bpe/tiny.yaml", setup.bpe)):
        for k, budget in enumerate((1e9, 4e9, 1.6e10)):
            name = f"{family}-{budget:.0e}"
            make_run(sweep / name, config, overrides, seed=k, flops_per_step=budget / 3)
            rows.append({"run": name, "family": family, "size": "tiny", "seed": k, "flop_budget": budget,
                         "status": "finished", "run_dir": str(sweep / name)})
    with open(sweep / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "report"
    assert cli_main(["compare", str(sweep), "--out", str(out), "--eval-bytes", "1500"]) == 0
    report = (out / "report.md").read_text()
    scaling = report.split("## Scaling")[1].split("\n## ")[0]
    assert "| BLT | 3 | 3 |" in scaling and "| BPE | 3 | 3 |" in scaling and scaling.count(" | fitted |") == 2
    assert "Crossings: BLT and BPE" in scaling
    assert imread(out / "bpb_vs_flops.png").shape[1] > 500
