"""The exported student's model card (``README.md``), in the Hugging Face model-card sections.

Every statement is taken from the run's report (``compliance.report.build_report``: the same DP statements,
evaluation and provenance an auditor reads) or from the export's manifest (the exported files, their parity and
their held-out quality). Training data appears as per-site counts only; nothing here is a record.
"""

from __future__ import annotations

import json
from typing import Any

from compliance.assessed import NOT_ASSESSED

TASK_TAGS = {"mlp": ("tabular-classification", "tabular-classification"),
             "bert": ("text-classification", "text-classification"),
             "causal_lm": ("text-generation", "text-generation")}
VARIANT_NAMES = {"torch-fp32": "student, torch fp32 (model.safetensors)", "onnx-fp32": "student, ONNX fp32",
                 "onnx-int8": "student, ONNX int8 (dynamic)", "onnx-int4": "student, ONNX int4 (weight-only)"}


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) if value else "none declared"
    return str(value)


def _front_matter(manifest: dict[str, Any]) -> list[str]:
    """YAML front matter; every free-text value is written as a JSON string, which YAML reads as it is."""
    tag, pipeline = TASK_TAGS[manifest["family"]]
    headline = manifest["headline_metric"]
    lines = ["---", "library_name: transformers", f"pipeline_tag: {pipeline}", "license: other",
             "tags:", "- fedistill", "- federated-learning", "- knowledge-distillation", "- differential-privacy",
             f"- {tag}"]
    quality = manifest.get("quality", {}).get("torch-fp32", {})
    if quality.get(headline) is not None:
        lines += ["model-index:", f"- name: {manifest['run_id']}-student", "  results:",
                  f"  - task: {{type: {tag}}}",
                  f"    dataset: {{name: {json.dumps('held-out test records: ' + str(manifest['heldout']))}, "
                  "type: private}",
                  f"    metrics: [{{type: {headline}, value: {quality[headline]:.4f}}}]"]
    return [*lines, "---", ""]


def _dp_section(report: dict[str, Any]) -> list[str]:
    privacy = report["privacy"]
    lines = ["### Differential privacy", "", privacy["federation"].get("statement", ""), "",
             "| site | unit of privacy | epsilon | delta | accountant | mechanism |", "|---|---|---|---|---|---|"]
    for site, block in privacy["sites"].items():
        if not isinstance(block, dict) or "mechanism" not in block:
            lines.append(f"| {site} | {NOT_ASSESSED}: {block} | | | | |")
            continue
        mechanism = block["mechanism"]
        lines.append(f"| {site} | {block['unit_of_privacy']} | {_number(block.get('epsilon_total'), 3)} | "
                     f"{block['delta']:.1e} | {block['accountant']['name']} ({block['accountant']['library']}) | "
                     f"noise multiplier {_number(mechanism.get('noise_multiplier'), 3)}, clipping norm "
                     f"{mechanism.get('clipping_norm')}, {mechanism.get('total_steps')} steps |")
    lines += ["", "Each site's statement, as the report gives it:", ""]
    lines += [f"- **{site}**: {block['statement']}" for site, block in privacy["sites"].items()
              if isinstance(block, dict) and block.get("statement")]
    warning = privacy["federation"].get("warning")
    return [*lines, *(["", f"Note: {warning}."] if warning else []), ""]


def _training_data(report: dict[str, Any]) -> list[str]:
    lines = ["| site | training records | training persons | validation records | test records |",
             "|---|---|---|---|---|"]
    for site, entry in report["data_inventory"]["sites"].items():
        splits = entry.get("splits", {}) if isinstance(entry, dict) else {}
        if not isinstance(splits, dict) or "train" not in splits:
            lines.append(f"| {site} | {NOT_ASSESSED}: the site keeps its counts | | | |")
            continue
        lines.append(f"| {site} | {_number(splits['train'].get('records'))} | "
                     f"{_number(splits['train'].get('persons'))} | {_number(splits.get('val', {}).get('records'))} | "
                     f"{_number(splits.get('test', {}).get('records'))} |")
    return lines


def _evaluation(report: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    evaluation, headline = report["evaluation"], manifest["headline_metric"]
    metrics = evaluation.get("metrics", [headline])
    lines = ["## Evaluation", "", f"### The run's models ({evaluation.get('data', '')})", "",
             "| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    overall = evaluation.get("overall")
    if isinstance(overall, list):
        lines += [f"| {row['model']} | " + " | ".join(_number(row.get(m)) for m in metrics) + " |" for row in overall]
    else:
        lines.append(f"| {_text(overall)} |" + " |" * len(metrics))
    lines += ["", "### The exported files", ""]
    quality = manifest.get("quality", {})
    if not quality:
        lines += [f"Quality of the exported files: {NOT_ASSESSED} (a deployed coordinator holds no held-out records; "
                  "`fedistill bench RUN_DIR --inputs FILE` measures it on records the deploying team holds).", ""]
    else:
        teacher = next((row for row in overall if row["model"] == "teacher"), None) if isinstance(overall, list) \
            else None
        reference = quality.get("torch-fp32", {}).get(headline)
        lower = headline in evaluation.get("lower_is_better", [])
        extra = "tokens" if manifest["family"] == "causal_lm" else "accuracy"
        share_header = (f"teacher's {headline} / the file's" if lower else f"% of the teacher's {headline}")
        lines += [f"On {manifest['heldout']}:", "",
                  f"| file | {headline} | change against fp32 | {share_header} | {extra} |",
                  "|---|---|---|---|---|"]
        for name, scored in quality.items():
            value = scored.get(headline)
            change = (value - reference) if value is not None and reference is not None else None
            share = None
            if teacher and teacher.get(headline) and value:
                share = teacher[headline] / value if lower else value / teacher[headline]
            lines.append(f"| {VARIANT_NAMES.get(name, name)} | {_number(value)} | "
                         f"{'n/a' if change is None else f'{change:+.4f}'} | "
                         f"{'n/a' if share is None else f'{100 * share:.1f}%'} | {_number(scored.get(extra))} |")
        lines.append("")
    for name, record in manifest.get("variants", {}).items():
        if "parity" in record:
            parity = record["parity"]
            lines.append(f"- {VARIANT_NAMES.get(name, name)}: onnxruntime's logits are within "
                         f"{parity['max_abs_logit_difference']:.2e} of torch's on {parity['records']} "
                         f"{parity['inputs']} records (tolerance {parity['tolerance']:.0e}).")
        elif record.get("file"):
            lines.append(f"- {VARIANT_NAMES.get(name, name)}: {record['method']}; logits within "
                         f"{record['max_abs_logit_difference_to_fp32']:.2e} of fp32.")
        else:
            lines.append(f"- {name}: not written: {record.get('skipped')}.")
    return [*lines, ""]


def model_card_markdown(report: dict[str, Any], manifest: dict[str, Any]) -> str:
    card, run = report["model_card"], report["run"]
    family, headline = manifest["family"], manifest["headline_metric"]
    loader = manifest["pretrained"]["loader"]
    lines = _front_matter(manifest)
    lines += [f"# Model card: {manifest['run_id']} student", "",
              f"This student ({family}) was distilled across {len(report['privacy']['sites'])} sites with fedistill: each site "
              "distilled its own teacher into the student under differential privacy and sent only clipped, noised "
              "updates" + (" through Flower's SecAgg+" if report["secure_aggregation"].get("enabled", True) else "")
              + ".", "",
              "## Model details", "",
              f"- **Model type:** {family}; settings {card['model']['settings']}",
              f"- **Parameters:** {_number(card['model']['parameters'])}",
              *([f"- **Classes (logit order):** {', '.join(manifest['class_names'])}"] if family != "causal_lm" else
                [f"- **Weights:** {manifest['pretrained']['weights_note']} (base digest "
                 f"{manifest['pretrained']['base_digest']})"]),
              f"- **Teacher:** {_text(card['teacher'].get('description'))}",
              f"- **Distillation:** {card['distillation']['loss']}",
              f"- **Aggregation:** {card['strategy']['aggregation']}, {card['strategy']['rounds']} rounds, "
              f"{card['strategy']['local_steps']} local steps",
              f"- **Task:** {_text(run.get('description'))}", "",
              "## Uses", "", "### Direct use", "", _text(card["intended_use"]), "",
              "### Out-of-scope use", "", _text(card["out_of_scope_uses"]), "",
              "## Bias, risks, and limitations", ""]
    lines += [f"- {caveat}" for caveat in card["caveats"]]
    int8 = manifest.get("quality", {}).get("onnx-int8", {}).get(headline)
    fp32 = manifest.get("quality", {}).get("torch-fp32", {}).get(headline)
    if int8 is not None and fp32 is not None:
        lines.append(f"- the int8 file changes held-out {headline} by {int8 - fp32:+.4f} against fp32")
    lines += ["- differential privacy bounds what the student reveals about one unit of privacy at each site; it does "
              "not make the student accurate for every subgroup, and it is not evaluated for fairness here", "",
              "## How to get started", "", "```python",
              "from transformers import " + ("AutoModelForCausalLM" if family == "causal_lm" else
                                              "AutoModelForSequenceClassification"),
              f"model = {loader.replace('DIR', repr('EXPORT_DIR'))}",
              "```", "", "onnxruntime: `onnxruntime.InferenceSession('EXPORT_DIR/onnx/model.onnx')`, inputs "
              + ", ".join(manifest["variants"].get("onnx-fp32", {}).get("inputs", ["x"])) + ", output `logits`."
              + (f" Input ids are {manifest['pretrained']['input_ids']}." if manifest["pretrained"].get("input_ids")
                 else ""), "",
              "## Training details", "", "### Training data", "",
              f"{_text(card['training_data'].get('dataset') if isinstance(card['training_data'], dict) else card['training_data'])}."
              " Per-site counts only; the records never left their sites:", ""]
    lines += _training_data(report)
    lines += ["", "### Training procedure", "",
              f"- transfer set: {card['distillation'].get('transfer_set')}",
              f"- temperature: {card['distillation'].get('temperature_schedule')} "
              f"{card['distillation'].get('temperature_start')} -> {card['distillation'].get('temperature_end')}",
              f"- optimizer: {card['strategy'].get('optimizer')}, learning rate {card['strategy'].get('learning_rate')}, "
              f"batch size {card['strategy'].get('batch_size')}, seed {card['strategy'].get('seed')}", ""]
    lines += _dp_section(report)
    lines += _evaluation(report, manifest)
    signature = manifest["signature"]
    teachers = sorted({block["teacher"]["digest"] for block in report["privacy"]["sites"].values()
                       if isinstance(block, dict) and isinstance(block.get("teacher"), dict)
                       and block["teacher"].get("digest")})
    lines += ["## Provenance", "",
              f"- **Run id:** {manifest['run_id']}", f"- **Config hash:** {manifest['config_hash']}",
              f"- **Final round:** {manifest['final_round']}; student digest {manifest['student_digest']}",
              f"- **Coordinator ledger head:** seq {manifest['ledger_head']['seq']}, {manifest['ledger_head']['hash']}",
              f"- **Teacher digests (as the sites declared them):** {', '.join(teachers) or NOT_ASSESSED}",
              f"- **Code:** {run.get('code_version')}",
              f"- **Signature:** {signature['format']}; key {signature['key_fingerprint']}, endorsed by the "
              f"coordinator's ledger key {signature['endorsed_by']}", "",
              "Check it with `fedistill verify-model EXPORT_DIR` (the signature, then the weights against the run's "
              "signed ledger), or with the model-signing CLI alone: `model_signing verify key --signature "
              "EXPORT_DIR/model.sig --public_key EXPORT_DIR/model_signing_key.pub.pem EXPORT_DIR`.", ""]
    return "\n".join(lines)
