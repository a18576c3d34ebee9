"""The current results, generated from the committed benchmark result files under
benchmarks/results/: docs/results.md (one table per benchmark) and the README's one results table
(between ``<!-- results:begin -->`` and ``<!-- results:end -->``).

    python -m benchmarks.results_table            # rewrite both
    python -m benchmarks.results_table --check    # exit 1 and print the differences when either is stale

Which result files are today's is decided here (``C10_RUNS``, ``ABLATIONS``, ``LATENCY_RUNS`` and
the other constants: the runs of the current protocol and defaults; the dated journal,
docs/history.md, says why each superseded the one before). Every
figure comes from the files: accuracies as mean ± std over seeds (sample std), differences paired
per seed, latencies as median (min-max). A row's machine is the device the file records, its date
the one the file (or its run's table.md or log) records; a file that records none gets the date
of its last commit, or "uncommitted". Nothing is trained or measured: it reads JSON and text.
"""

from __future__ import annotations

import argparse
import difflib
import statistics
import sys
from pathlib import Path

from benchmarks.tables.fmt import (
    BEGIN,
    END,
    METHODS,
    README,
    REPO,
    RESULTS_MD,
    Refs,
    mean_std,
    median_range,
    read_json,
    recorded_date,
    table,
)
from benchmarks.tables.house import (
    FRESH_CLONES,
    TRAINED_MODEL,
    TRAINED_MODEL_TUNED,
    YOUR_MODEL,
    fastnas,
    fresh_clone_runs,
    fresh_clone_stages,
    int8,
    joint_precision,
    make_run_summary,
    paired_readings,
    precision_auto,
    precision_ratio,
    streaming,
    tiny_margin,
    trained_model,
    your_model,
)
from benchmarks.tables.others import (
    LATENCY_RUNS,
    PIPELINE_ENGINE,
    PIPELINE_LOG,
    cifar10_pipeline,
    gpu_check_engines,
    gpu_check_stages,
    latency_model,
    robustness,
    timing_noise,
    train_throughput,
)
from benchmarks.tables.protocol import (
    C10_RUNS,
    C10_UNPRUNED,
    ablations,
    better_baseline,
    by_seed,
    cifar10_protocol,
    digits_protocol,
    landing_of,
)

# --------------------------------------------------------------------------------------------
# The documents


SECTIONS = (
    ("Pruning under a latency budget: the CIFAR-10 CPU preset",
     "Every method starts from the same student and trains `prune.epochs` (8) with the same distillation loss; "
     "each baseline is matched to the same measured-latency band as ours (docs/pruning.md). Accuracy in %, mean ± "
     "std over seeds; the holdout is 10,000 CIFAR-10 images the preset never uses (its own test split, 1,000 "
     "images, has a standard error of about 1.6 points). Latency: compare's final joint measurement, measured / "
     "budget; \"outside the band\" counts the seeds whose network read outside compare's band.", cifar10_protocol),
    ("Ablations of ours", "The same protocol with one setting changed, against the default's networks of the "
     "same seeds.", ablations),
    ("Pruning under a latency budget: digits (the default params)",
     "The default pipeline's data (270 test images: one image is 0.37 points).", digits_protocol),
    ("The CIFAR-10 CPU preset end to end (one run)",
     "Every stage from an empty DVC cache, budget 0.5, one seed; test split of 1,000 images.", cifar10_pipeline),
    ("Latency model (`profile`)", "The real profile stage run several times in a row on the default params: "
     "channel step, held-out error of the calibrated predictor on random sub-networks it never saw "
     "(docs/latency.md).", latency_model),
    ("Timing protocol on identical networks", "The student measured with identical copies of itself (true ratio "
     "1.000) in interleaved rounds, with the product's estimator (the fastest window).", timing_noise),
    ("Training throughput", "ResNet-56 training steps against the device's measured matmul rate: on the 2-core "
     "CPU, and on the GPU check's H200 (the CUDA graph step against the eager one in the same run).",
     train_throughput),
    ("The GPU check: every stage on CUDA (NVIDIA H200)",
     "`presets/gpu-check.yaml` (10,000 CIFAR-10 images, a few epochs per stage, the torch target on CUDA in fp16 at "
     "batch 32 with CUDA graphs) with `python -m stages`, no DVC; accuracies of minutes of training are not the "
     "point. The H100 run of 2026-11-22 crashed in train_student and prune and was refused at budget 0.5 "
     "(../shared/GPU.md).", gpu_check_stages),
    ("The GPU check: engines in every precision (NVIDIA H200)",
     "`benchmarks/gpu_engines.py`: the PyTorch-native engine (torch.export program replayed as a CUDA graph) in "
     "fp32, fp16 and bf16; TensorRT was not installed there (its wheels are far over what a device call can carry); "
     "INT8 with ONNX Runtime on the host CPU. torchvision models with random weights: latency only (random "
     "mobilenet_v2's activations shrink to 3e-8, below fp16's range: its fp16 logits underflow to zero).", gpu_check_engines),
    ("`make run` on the default params in fresh clones",
     "`git clone` of one commit into new directories, `make install`, then `make run` (every stage through "
     "`dvc repro`, the report), one clone after another on a quiet machine. Figures compared between runs: the "
     "accuracies (270 test images: one image is 0.37 points), the latency verdicts and a digest of the pruned "
     "network's kept channels. The latest check first; then the same check on another kind of CPU (each source "
     "names its machine): floating-point kernels differ between CPUs, so accuracies and digests need not agree "
     "across them.", fresh_clone_runs),
    ("Time per stage of `make run`",
     "From each stage's `Running stage` line to the next (DVC's bookkeeping included), median (range) over the "
     "latest check's clones above.", fresh_clone_stages),
    ("Your own model (the README's walk-through)",
     "`benchmarks/your_model.py`: CIFAR-10 JPEGs laid out as train/ and test/ class folders (sizes in the source's "
     "title line), a torchvision resnet18 trained outside the pipeline and given as a weights file, the README's "
     "params and `make run` in a fresh clone (search and student do not run). One run, one seed: differences of a "
     "few images (0.2 points each) are noise.", your_model),
    ("Images streamed from disk (`prepare.storage: files`)",
     "`benchmarks/streaming.py`: CIFAR-10 JPEGs upscaled to 256 px files, `prepare` and one training epoch at 224 px "
     "(random resized crop, DataLoader workers) for a folder of N and of 4N images, and the in-memory path on N. "
     "PSS: proportional set size summed over the process and its DataLoader workers (shared pages counted once). "
     "One run each: images/s is one epoch on a shared 2-core machine.", streaming),
    ("Pruning a trained model",
     "`benchmarks/trained_model.py`: torchvision resnet18 trained outside the pipeline (plain torch, train/ only) on "
     "CIFAR-10 JPEGs, pruned to a fraction of its own measured latency by the real prune and compare stages; every "
     "method from the same weights, distilled from the unpruned model, the same `prune.epochs`. Held-out accuracy: "
     "the folder's test/, which no stage trains or selects on (val/ is a folder of its own). "
     "Measured / budget: compare's verdict at the file's commit (since 678f8f4: every network read in a pair with the "
     "model, the median of the readings); scp: the prune stage's reading. A peer over the budget there "
     "does not count as the best peer.", trained_model),
    ("Pruning a trained model, every method fine-tuned at lr 0.01 with pad-crop-flip",
     "The same benchmark, trained model and budgets, with two params changed for every method (ours, scp, the peers and "
     "FastNAS alike, `--set prune.optimizer.lr=0.01 train.augment=padcrop_flip`): a fifth of the default fine-tuning "
     "rate, which a trained network wants, and pad-crop-flip augmentation of the 32 px training images (default: "
     "none). The peers' strongest form measured here. Two more rows (`--variant prune.taylor_labels=sampled "
     "--unpruned-reference`): ours ranking channels by their Fisher information (`prune.taylor_labels: sampled`), "
     "against the same peers per seed, and the whole trained model fine-tuned exactly as every method is (compare's "
     "`unpruned`; one model, shown at both budgets).", lambda: trained_model(TRAINED_MODEL_TUNED)),
    ("FastNAS (TensorRT Model Optimizer) from the same trained model",
     "`benchmarks/fastnas.py` (nvidia-modelopt installed beside the project, not a dependency): one FastNAS search per "
     "FLOPs constraint from the trained model above (one sensitivity map, scored on val/), each subnet measured paired "
     "with the model, the largest under each run's budget band taken, then trained as every method above (same "
     "distillation, epochs, seed) and judged with ours, each in pairs with the model. FastNAS constrains FLOPs, not latency: the "
     "FLOPs constraint taken is the largest whose measured latency fits.", fastnas),
    ("How one latency reading strays (paired with the model, or in a crowd)",
     "`benchmarks/paired_readings.py`: one pruned network (a run of the trained-model benchmark) against its model, "
     "measured repeatedly four ways: the closed loop's one reading, the median of three (`prune.loop_readings`), one "
     "reading of compare's protocol in a pair, and one in a run with four other networks of its size. The crowd reads "
     "it lower against the model than a pair does, which is why compare measures every network in a pair.",
     paired_readings),
    ("How a reading across precisions strays (INT8 against the FP32 model)",
     "`benchmarks/precision_ratio.py`: the CIFAR-10 CPU preset's student and one network pruned from it, each as its "
     "Q/DQ model read paired with the student in fp32 (as every reading against a budget of the fp32 student is), "
     "once per round with `target.timing` and once with compare's protocol, rounds one after the other over a few "
     "minutes. `± 90%`: half the 5-95% interval of one reading, and of the median of 3 and of 5 (resampled from the "
     "readings), over the median. It sizes `prune.reference_readings` (5): two networks in one precision read within "
     "5% of each other on the same machine.", precision_ratio),
    ("INT8 against FP32 on this CPU",
     "`benchmarks/int8.py`: ONNX Runtime's CPU provider, one thread, batch 1; `pipeline.quantize` (Q/DQ, int8 "
     "per-channel weights) with uint8 activations (U8S8) and int8 activations (S8S8); the three sessions timed "
     "interleaved in each round. Accuracy on held-out images as each model's name says (the trained-model benchmark's "
     "test/ of 3,000 images; the CIFAR-10 preset's holdout of 10,000 images its prepare stage left out); the 224 px "
     "torchvision models have random weights (no trained 224 px weights offline): latency only.", int8),
    ("Pruning and precision under one budget (INT8, CPU)",
     "`benchmarks/joint_precision.py`: a model at budgets that are fractions of its fp32 latency on ONNX Runtime "
     "(CPU, 1 thread, batch 1), pruned with `target.precision: fp32`, quantized alone, and pruned with "
     "`target.precision: int8` (every latency of profile and prune read on the Q/DQ model; the budget a fraction of "
     "the fp32 model, `prune.budget_reference: fp32`), the same seed and prune settings in both precisions. The "
     "models: the trained-model benchmark's resnet18 (32 px, trained outside the pipeline; its pruned-fp32 column is "
     "that benchmark's runs), and the CIFAR-10 CPU preset's searched student. All networks read in one process, each "
     "paired with the fp32 model (latency / budget: compare's verdict protocol, median (range) over seeds; in "
     "brackets, the median read with `target.timing`, the protocol the prune runs' closed loop read with; "
     "`read again`: every pair read once more after all were judged, median (range) over seeds and readings; "
     "`unpruned, trained as long`: the student given the pruned networks' training, not cut, in int8, "
     "`--unpruned-reference`); "
     "accuracy in the precision each is deployed in, on the split named (the resnet18's held-out test/ of 3,000 images; the "
     "preset's holdout of 10,000 images its prepare stage left out). Machines differ (see each source): INT8's gain "
     "depends on the CPU (VNNI).",
     joint_precision),
    ("The precision `target.precision: auto` chooses (CPU)",
     "`benchmarks/precision_auto.py`: the real precision stage, run several times on trained networks: int8 is kept "
     "when its validation accuracy (the Q/DQ model the engine would build, layers left in float included) is within "
     "`engine.max_accuracy_drop` of the fp32 ONNX model's and the median of 5 paired readings of those two models on the "
     "target is under 1. Accuracies are the first run's (every run computes the same).", precision_auto),
    ("The tiny preset against the chance guard",
     "`presets/tiny.yaml` (the end-to-end tests' pipeline) with every training seed shifted: each network's test "
     "accuracy against the limit `pipeline.train.check_above_chance` refuses below. The margin is what a CPU's "
     "floating-point kernels would have to eat before a test fails.", tiny_margin),
    ("Failure handling through real DVC", "What a user sees when training fails, a stage is killed, or a "
     "bundle is tampered with.", robustness),
)


def results_md() -> str:
    out = ["# Current results", "",
           "Generated by `python -m benchmarks.results_table` from the result files under `benchmarks/results/`; "
           "do not edit by hand (`python -m benchmarks.results_table --check` and tests/test_results_table.py fail "
           "when this file and the files disagree). Each row names its source (src), and each source its command, "
           "machine and date. How each result came about, and what it replaced: docs/history.md.", ""]
    for title, intro, build in SECTIONS:
        header, rows, refs = build()
        out += [f"## {title}", "", intro, ""] + table(header, rows) + ["", "Sources:", ""] + refs.legend() + [""]
    out += ["## Not in a result file", "",
            "- `make test` on a fresh clone (wall time, test counts): docs/history.md, the latest dated "
            "section on fresh clones, and CI.",
            "- Anything on a GPU, and any TensorRT figure: not measured.", ""]
    return "\n".join(out)


def readme_table() -> str:
    """The README's headline rows: the protocol at each budget, the latency model, the preset end to end."""
    refs = Refs()
    rows = []
    unpruned = C10_UNPRUNED.load()
    for b, run in sorted(C10_RUNS.items()):
        runs = [r for r in run.load() if r["budget"] == b]
        split = "holdout" if all("holdout_acc" in r["compare"]["ours"] for r in runs) else "test split"
        key = "holdout_acc" if split == "holdout" else "test_acc"
        k = refs.key(run.rows, run.command(), run.machine())
        accs = {m: by_seed(runs, m, key) for m, _ in METHODS}
        seeds = sorted(accs["ours"])
        src = k
        if not accs["unpruned"] and b != 0.3:  # the reference is not cut to a budget: the 0.7 run's, same seeds
            accs["unpruned"] = {s: v for s, v in by_seed(unpruned, "unpruned", key).items() if s in seeds}
            src = f"{k}, {refs.key(C10_UNPRUNED.rows, '', '')} (unpruned)"
        best, over = better_baseline(runs, key)
        acc_cells = [f"**{mean_std(list(accs['ours'].values()))}**"] + \
            [mean_std(list(accs[m].values())) for m in ("uniform", "l1", "unpruned")]
        rows.append([f"budget {b:g}: accuracy % on the {split}, {len(seeds)} seeds", *acc_cells,
                     mean_std([accs["ours"][s] - best[s] for s in seeds], signed=True)
                     + (f" (that baseline over budget in {over}/{len(seeds)})" if over else ""), src])
        lat = []
        for m in ("ours", "uniform", "l1"):
            ratios, marks = landing_of(runs, m)
            lat.append(median_range(ratios) + ("" if marks == "-" else f", {marks}"))
        rows.append([f"budget {b:g}: measured / budget, median (range)", *lat, "-", "", k])
    lm = read_json(LATENCY_RUNS[0][1])
    k = refs.key(LATENCY_RUNS[0][1], "", "")
    rows.append([f"latency model: held-out error (MAPE), {len(lm)} profile runs on digits",
                 median_range([100 * r["mape"] for r in lm], 2, "%"), "", "", "", "", k])
    _, prow, _ = cifar10_pipeline()
    total = prow[-1][3]
    eng = read_json(PIPELINE_ENGINE)
    k = refs.key(PIPELINE_LOG, "", "")
    rows.append(["CIFAR-10 CPU preset end to end, one run: wall time; engine latency / budget",
                 f"{total}; engine {eng['measured_over_budget']:.2f} ({eng['verdict']})", "", "", "", "", k])
    ym = read_json(YOUR_MODEL)
    k = refs.key(YOUR_MODEL, "", "")
    base = ym["baselines_test_acc"]
    rows.append([f"your own model (resnet18 trained outside, CIFAR-10 JPEGs at {ym['data']['size']} px), budget 0.5, one run: test "
                 f"accuracy %; input model {100 * ym['input_model_test_acc']:.1f}",
                 f"**{100 * ym['compressed_test_acc']:.1f}**", f"{100 * base.get('uniform', float('nan')):.1f}",
                 f"{100 * base.get('l1', float('nan')):.1f}", "-",
                 f"{100 * (ym['compressed_test_acc'] - max(base.values())):+.1f} (one run: noise)", k])
    for path, recipe in ((TRAINED_MODEL, "the default fine-tuning"),
                         (TRAINED_MODEL_TUNED, "every method fine-tuned at lr 0.01 with pad-crop-flip")):
        rows.append(_trained_model_row(refs, path, recipe))
    if "variant" in read_json(TRAINED_MODEL_TUNED)["summary"]["0.5"]:
        rows.append(_trained_model_row(refs, TRAINED_MODEL_TUNED, "the same peers; ours with", variant=True))
    run_s, exits = make_run_summary()
    k = refs.key(FRESH_CLONES, "", "")
    rows.append([f"`make run` (digits default), fresh clones: wall time, install excluded ({exits})", run_s,
                 "", "", "", "", k])
    header = ["result", "ours / value", "uniform", "Torch-Pruning L1", "unpruned, trained as long",
              "ours - better baseline, paired", "src"]
    legend = [f"- **{kk}** `{p}` ({recorded_date(p)})" for kk, p, _, _ in refs.items]
    return "\n".join(table(header, rows) + ["", *legend])


def _trained_model_row(refs: Refs, path: Path, recipe: str, variant: bool = False) -> list[str]:
    """The README row of benchmarks/trained_model.py's result ``path`` (``recipe``: how every method was
    fine-tuned). ``variant``: the row of ours run with other params (``--variant``), the same peers."""
    tmd = read_json(path)
    tm, tmeta = tmd["summary"], tmd["meta"]
    k = refs.key(path, "", "")
    cells = [tm[b] for b in ("0.5", "0.3")]
    best_tp = [max(("tp_norm", "tp_taylor"), key=lambda m: statistics.mean(c[m]["test_acc"])) for c in cells]
    ours = [c["variant"] for c in cells] if variant else [c["ours"] for c in cells]
    lead = [c["variant"]["minus_best_peer"] for c in cells] if variant else [c["ours_minus_best_peer"] for c in cells]
    what = f"{recipe} {cells[0]['variant']['label'].removeprefix('ours, ')}" if variant else recipe
    u = tmeta.get("unpruned_trained")  # the whole model fine-tuned as every method (one model: both budgets)
    return [f"a trained resnet18 (outside the pipeline, {tmeta['size']} px, "
            f"{100 * tmeta['outside']['test_acc_outside']:.1f}% held out), pruned to 0.5 / 0.3 of its latency, {what}, "
            f"{' / '.join(str(len(o['test_acc'])) for o in ours)} seeds, held-out acc %; last column: ours - the best of "
            "uniform, Torch-Pruning and FastNAS per seed",
            " / ".join(f"**{mean_std(o['test_acc'], 100, 1)}**" for o in ours),
            " / ".join(mean_std(c["uniform"]["test_acc"], 100, 1) for c in cells),
            " / ".join(f"{mean_std(c[m]['test_acc'], 100, 1)} (group {'L2' if m == 'tp_norm' else 'Taylor'})"
                       for c, m in zip(cells, best_tp)),
            f"{mean_std(u['test_acc'], 100, 1)} ({len(u['seeds'])} seeds; either budget)" if u else "-",
            " / ".join(mean_std(d, 100, 2, signed=True) for d in lead), k]


def render_readme(text: str) -> str:
    """``text`` (the README) with the generated table between the markers."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: the markers {BEGIN} and {END} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{readme_table()}\n{END}{tail}"


def expected() -> dict[Path, str]:
    """What README.md and docs/results.md should hold, generated in memory."""
    return {README: render_readme((REPO / README).read_text()), RESULTS_MD: results_md()}


def differences(want: dict[Path, str]) -> list[str]:
    out = []
    for path, text in want.items():
        have = (REPO / path).read_text() if (REPO / path).is_file() else ""
        if have != text:
            out += list(difflib.unified_diff(have.splitlines(), text.splitlines(), f"{path} (committed)",
                                             f"{path} (generated)", lineterm="", n=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the differences when "
                   "README.md or docs/results.md is not what the result files give")
    args = p.parse_args(argv)
    want = expected()
    if args.check:
        diff = differences(want)
        if diff:
            print("\n".join(diff))
            print("\nstale: run `python -m benchmarks.results_table`", file=sys.stderr)
            return 1
        print("README.md and docs/results.md match the result files")
        return 0
    for path, text in want.items():
        (REPO / path).write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

