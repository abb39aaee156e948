"""``MODEL_CARD.md``: the bundle's model card, written by export from the run's records and the validation report.

What it was trained on (images per class and split), its metrics with calibration, the validation report, and the
intended use and limits, in text generated from the manifest's facts; listed in the manifest with its checksum.
A Keras model file that transferkit did not train (``training["source"] == FOREIGN_SOURCE``) has no run records:
its card says so where a training fact would be, instead of leaving a blank that reads like "none".
"""

from __future__ import annotations

from typing import Any

from transferkit.core.backbones import Backbone
from transferkit.core.manifest import ValidationReport
from transferkit.training.report import calibration_table

FOREIGN_SOURCE = "keras_file"  # training["source"] of a bundle made from a Keras model file (export/foreign.py)
NOT_TRAINED_HERE = "Not known: this model was not trained by transferkit"


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _counts(counts: dict[str, dict[str, int]], class_names: list[str]) -> list[str]:
    if not counts:
        return ["Not recorded (the bundle was not exported from a transferkit run directory)."]
    splits = [s for s in ("train", "val", "test") if s in counts]
    lines = ["| class | " + " | ".join(splits) + " | total |", "|---" * (len(splits) + 2) + "|"]
    for name in class_names:
        values = [counts[s].get(name, 0) for s in splits]
        lines.append(f"| {name} | " + " | ".join(map(str, values)) + f" | {sum(values)} |")
    totals = [sum(counts[s].values()) for s in splits]
    lines.append("| **all** | " + " | ".join(map(str, totals)) + f" | {sum(totals)} |")
    return lines


def _metrics(training: dict) -> list[str]:
    test, val = training.get("test") or {}, training.get("val") or {}
    if not test and not val:
        return ["Not recorded."]
    lines = ["| split | images | accuracy | top-5 accuracy | ECE | NLL |", "|---|---|---|---|---|---|"]
    for name, row in (("test", test), ("validation", val)):
        if row:
            lines.append(f"| {name} | {row.get('samples', 'n/a')} | {_number(row.get('accuracy'))} | "
                         f"{_number(row.get('top5_accuracy'))} | "
                         f"{_number(row.get('ece'))} | {_number(row.get('nll'))} |")
    lines += ["", "Measured by training on its held-out splits with the saved (calibrated, where calibration was "
              "applied) model. ECE: expected calibration error over 15 equal-width bins of the top-1 confidence; "
              "NLL: mean -log p(true class)."]
    return lines


def _calibration(calibration: dict | None) -> list[str]:
    if not calibration:
        return ["Not calibrated (the run recorded no calibration): the scores are softmax outputs as trained, not "
                "probabilities you can threshold on."]
    if not calibration.get("applied"):
        lines = [f"Not calibrated: {calibration.get('reason')}. The scores are softmax outputs as trained."]
    else:
        lines = [f"Temperature scaling, T = {calibration['temperature']:.4f}, fitted on the validation split "
                 "(negative log-likelihood) and folded into the model's final layer: every format in this bundle "
                 "outputs the calibrated probabilities, and the validation report below compares them. The top-1 "
                 "class is the same as without calibration."]
    table = calibration_table(calibration)
    if table:
        lines += table + ["", "The validation split chose T, so its 'after' is optimistic; the test split is the fair "
                          "check."]
    return lines


def _origin(row: Backbone, training: dict) -> str:
    """Where the model came from, for the card's first paragraph."""
    if training.get("source") != FOREIGN_SOURCE:
        return (f"{row.name} ({row.family}) trained by transferkit (strategy: "
                f"{training.get('strategy') or 'not recorded'}; backbone weights: "
                f"{training.get('weights') or 'not recorded'})")
    softmax = ", with a softmax appended to its logits" if training.get("outputs") == "logits" else ""
    return (f"the Keras model `{training.get('model_name', 'n/a')}` from `{training.get('model_file', 'n/a')}` "
            f"(sha256 {str(training.get('model_sha256', 'n/a'))[:12]}…), not trained by transferkit: bundled as it "
            f"is{softmax}")


def _foreign_sections(training: dict) -> dict[str, list[str]]:
    """The training-dependent sections of a card for a model transferkit did not train."""
    return {
        "data": [f"{NOT_TRAINED_HERE}. The export was validated on images from `{training.get('data', 'n/a')}` "
                 "(see below), which may or may not overlap its training data."],
        "metrics": ["Not recorded: transferkit did not train this model, so it has no held-out metrics for it. "
                    "The Keras accuracy in the validation table below is measured on the --data images given at "
                    "export."],
        "calibration": ["Not calibrated by transferkit (the model was not trained by transferkit): the scores are "
                        "the model's softmax outputs, not probabilities you can threshold on unless its author "
                        "calibrated them."],
    }


def _run_sections(training: dict, class_names: list[str]) -> dict[str, list[str]]:
    return {
        "data": [f"Images per class and split (run: `{training.get('run_dir', 'not recorded')}`):", "",
                 *_counts(training.get("counts") or {}, class_names)],
        "metrics": _metrics(training),
        "calibration": _calibration(training.get("calibration")),
    }


def _cam_line(explain) -> str:
    if explain is None:
        return "- no class activation map"
    if not explain.available:
        return f"- no class activation map: {explain.reason}"
    height, width = explain.resolution
    return (f"- output `{explain.output}`: [N, {height}, {width}], where the model looked for its top class (class "
            "activation map: the last feature maps weighted by the class layer's weights; the validation report's "
            "`map Δ` column compares it with Keras')")


def model_card(name: str, row: Backbone, image_size: int, class_names: list[str], preprocessing: str,
               training: dict, report: ValidationReport, formats: list[str], explain=None) -> str:
    """The text of ``MODEL_CARD.md``."""
    classes = ", ".join(f"`{c}`" for c in class_names)
    foreign = training.get("source") == FOREIGN_SOURCE
    sections = _foreign_sections(training) if foreign else _run_sections(training, class_names)
    lines = [
        f"# Model card: {name}", "",
        f"An image classifier of {len(class_names)} classes ({classes}): {_origin(row, training)}. "
        f"Formats: {', '.join(formats)}.",
        "", "## Input and output", "",
        f"- input `image`: RGB pixels 0-255, shape [N, {image_size}, {image_size}, 3] (uint8), resized by "
        "`transferkit.core.images.decode_image` (bilinear, squashed to the square, no crop; see `resize` in "
        "`manifest.json`)",
        f"- preprocessing inside the graph: {preprocessing}",
        f"- output `probabilities`: [N, {len(class_names)}], in this class order: {classes} (also in every ONNX "
        "file's metadata, key `class_names`)",
        _cam_line(explain),
        "", "## Training data", "",
        *sections["data"],
        "", "## Metrics", "",
        *sections["metrics"],
        "", "## Calibration", "",
        *sections["calibration"],
        "", "## Validation of the exported formats", "",
        f"Every format against the Keras model on {report.images} images ({report.source}); "
        f"{'all gates passed' if report.passed else 'A GATE FAILED (published with --allow-mismatch)'}.", "",
        report.table(),
        "", "## Intended use and limits", "",
        f"- Intended use: sorting images into the {len(class_names)} classes above, for images like those it was "
        "trained on (same kind of subject, camera, framing and lighting).",
        "- Every input is assigned to one of these classes: the model has no 'none of these' answer, and an image "
        "of something else still gets a confident-looking score.",
        f"- Images are resized to {image_size}x{image_size} px without keeping the aspect ratio; detail smaller "
        "than that resolution is lost.",
        ("- Not evaluated by transferkit: it did not train this model and knows nothing of its training data. "
         if foreign else
         "- Not evaluated outside its data: the metrics above come from held-out images of the same dataset. ")
        + "Measure accuracy and calibration on your own images (`transferkit predict --evaluate`) before relying on "
        "it, and re-check when the images change.",
        "- Scores: " + ("calibrated on the validation split, so a threshold on the score means roughly that share "
                        "of correct answers on data like it; calibration does not carry over to other data."
                        if (training.get("calibration") or {}).get("applied") else
                        "not calibrated; a threshold on the score does not mean a probability of being right."),
        "- Not for decisions about people or for safety-critical use without a separate evaluation.",
        "",
    ]
    return "\n".join(lines)
