"""The benchmark report as Markdown tables, with the machine it came from."""

from __future__ import annotations

from kvseg.bench.loader import loader_markdown
from kvseg.bench.video import video_markdown
from kvseg.config import ModelConfig
from kvseg.models.build import describe


def to_markdown(report: dict) -> str:
    """The report as Markdown tables, with the machine it came from."""
    machine = report["machine"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in machine["gpus"]) or "none"
    lines = [
        f"# kvseg benchmark: {report['run']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores; GPU: {gpus}"
        + (f", driver {machine['gpu_driver']}" if machine.get("gpu_driver") else ""),
        f"torch {machine['packages'].get('torch')}, onnxruntime "
        f"{machine['packages'].get('onnxruntime-gpu') or machine['packages'].get('onnxruntime')}; "
        f"providers used: {', '.join(report['providers_used']) or 'none'}",
        f"Model: {describe(ModelConfig(**report['model']))}, {report['image_size']}x{report['image_size']}",
        "",
        "## Inference latency",
        "",
        "| backend | batch | median ms | p90 ms | p99 ms | images/s | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, entry in report["backends"].items():
        for row in entry["latency"]:
            notes = "; ".join(entry["notes"])
            if "copy" in row:
                notes += f"; copies H2D {row['copy']['host_to_device_ms']:.2f} ms, D2H {row['copy']['device_to_host_ms']:.2f} ms"
            lines.append(f"| {name} | {row['batch_size']} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | "
                         f"{row['p99_ms']:.2f} | {row['images_per_s']:.1f} | {notes} |")
    if report["skipped"]:
        lines += ["", "Skipped:"] + [f"- {name}: {reason}" for name, reason in report["skipped"].items()]
    lines += ["", "## IoU parity on the test split", "",
              "Reported only: export verified each model on the validation split, and no decision is taken here.", "",
              "| backend | IoU per-image | IoU dataset | Dice per-image | Dice dataset "
              "| IoU diff vs torch-fp32 | pixels differing | flag |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, entry in report["parity"].items():
        lines.append(
            f"| {name} | {entry['iou_per_image']:.4f} | {entry['iou_dataset']:.4f} | {entry['dice_per_image']:.4f} | "
            f"{entry['dice_dataset']:.4f} | {entry.get('iou_diff_vs_torch_fp32', 0):+.2e} | "
            f"{entry.get('pixels_differing_vs_torch_fp32', 0):.4%} | {'FLAGGED' if entry.get('flagged') else ''} |"
        )
    training = report.get("training")
    if training:
        lines += ["", "## Training speed against the study's 300 s/epoch", "",
                  f"{training['model']}, {training['image_size']}x{training['image_size']}, "
                  f"batch {training['batch_size']}, {training['steps']} timed steps on {training['device']}; "
                  f"harness: {training['mixed_precision']} autocast, channels_last, {training['num_workers']} worker(s), "
                  f"data from {training.get('data_source', 'a cache')}; the study's image size and width are not given.", "",
                  "| loop | images/s | projected s per 472-image epoch | speedup vs 300 s |",
                  "| --- | ---: | ---: | ---: |"]
        for key, label in (("plain_fp32_nchw", "plain fp32 NCHW"), ("harness", "kvseg harness")):
            row = training[key]
            lines.append(f"| {label} | {row['images_per_s']:.1f} | {row['projected_epoch_s']:.1f} "
                         f"| {row['speedup_vs_study']:.1f}x |")
        lines.append(f"\nHarness against plain loop: {training['harness_vs_plain']:.2f}x.")
        lines += _phase_lines(training)
    history = report.get("training_history")
    if history:
        lines.append(
            f"\nMeasured in the run itself ({history['epochs']} epochs): median {history['median_images_per_s']:.1f} "
            f"images/s, {history['median_epoch_s']:.1f} s per epoch; projected {history['projected_epoch_s']:.1f} s "
            f"per 472-image epoch ({history['speedup_vs_study']:.1f}x the study)."
        )
    if report.get("loader"):
        lines += loader_markdown(report["loader"])
    if report.get("video"):
        lines += video_markdown(report["video"])
    return "\n".join(lines) + "\n"


def _phase_lines(training: dict) -> list[str]:
    """Where the harness's training step goes: its phases, then the operators with the most self time."""
    lines = []
    split = training.get("phase_split")
    if split:
        lines += ["", f"Where a harness step goes ({split['steps']} steps, each phase timed; a GPU is synchronised "
                  "at every phase boundary):", "", "| phase | ms per step | share |", "| --- | ---: | ---: |"]
        lines += [f"| {phase} | {row['ms_per_step']:.1f} | {row['share']:.1%} |" for phase, row in split["phases"].items()]
    operators = training.get("top_operators")
    if operators:
        lines += ["", "Top operators by self time (torch.profiler over the same loop):", "",
                  "| operator | ms per step | share | calls per step |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{row['name']}` | {row['ms_per_step']:.1f} | {row['share']:.1%} | {row['calls_per_step']:.0f} |"
                  for row in operators]
    return lines
