"""mkdocs hook: the pages' generated parts, built from the code at build time so they cannot drift.

A page asks for a part with an HTML comment on a line of its own:

- `<!-- generated: dpo-config-fields -->`: `DPOConfig`'s own fields (TRL 1.16's and ours), then the
  `transformers.TrainingArguments` fields it inherits, each with its default and its `metadata["help"]`;
- `<!-- generated: cli-flags -->`: the flags of `dpo-trainer`, read from `dpo_trainer.cli.make_parser()`;
- `<!-- generated: loss-registry -->`: the loss names of `dpo_trainer.losses.LOSSES` and their functions.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re

# TRL 1.16's `DPOConfig` fields beyond `TrainingArguments` (tests/test_docs.py checks this list against TRL's
# class where TRL is installed), and the `TrainingArguments` defaults TRL's config changes.
TRL_DPO_FIELDS = frozenset(
    """model_init_kwargs trust_remote_code router_aux_loss_coef disable_dropout dataset_num_proc max_length
    truncation_mode padding_free pad_to_multiple_of precompute_ref_log_probs precompute_ref_batch_size
    loss_type loss_weights ld_alpha f_divergence_type f_alpha_divergence_coef label_smoothing beta
    use_weighting discopop_tau activation_offloading sync_ref_model ref_model_mixup_alpha ref_model_sync_steps
    pad_token""".split()
)
TRL_CHANGED_DEFAULTS = frozenset({"learning_rate", "logging_steps", "gradient_checkpointing", "bf16"})

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


def _cell(text) -> str:
    """One Markdown table cell: one line, pipes escaped."""
    text = " ".join(str(text).split())
    return text.replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return f"`{value!r}`".replace("|", "\\|")


def own_field_names(cls) -> list[str]:
    """The fields `cls`'s own body declares (new ones and the defaults it changes), in source order."""
    names = {field.name for field in dataclasses.fields(cls)}
    return [name for name in inspect.get_annotations(cls) if name in names]


def config_fields() -> str:
    from transformers import TrainingArguments

    from dpo_trainer import DPOConfig

    fields = {field.name: field for field in dataclasses.fields(DPOConfig)}
    own = own_field_names(DPOConfig)
    inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
    lines = [
        "### DPO fields",
        "",
        f"The {len(own)} fields `DPOConfig` declares itself. *TRL 1.16*: a field of TRL's `DPOConfig`, with "
        "TRL's meaning and default; *ours*: an extra of this library (optional: its default keeps TRL's "
        "behaviour); *TrainingArguments, TRL's default*: a `transformers.TrainingArguments` field whose "
        "default TRL's config changes. The full meaning of each is in the parameters of "
        "[`DPOConfig`](#dpo_trainer.DPOConfig) below.",
        "",
        "| field | default | from | meaning |",
        "|---|---|---|---|",
    ]
    for name in own:
        if name in TRL_CHANGED_DEFAULTS or (name in inherited and name not in TRL_DPO_FIELDS):
            origin = "TrainingArguments, TRL's default"
        elif name in TRL_DPO_FIELDS:
            origin = "TRL 1.16"
        else:
            origin = "ours"
        field = fields[name]
        lines.append(f"| `{name}` | {_default(field)} | {origin} | {_cell(field.metadata.get('help', ''))} |")
    rest = [name for name in fields if name not in own and not name.startswith("_") and fields[name].init]
    lines += [
        "",
        "### Inherited from `transformers.TrainingArguments`",
        "",
        f"The other {len(rest)} fields, as the installed `transformers` defines them (TRL's `DPOConfig` "
        "inherits the same ones).",
        "",
        "| field | default | meaning |",
        "|---|---|---|",
    ]
    for name in rest:
        field = fields[name]
        lines.append(f"| `{name}` | {_default(field)} | {_cell(field.metadata.get('help', ''))} |")
    return "\n".join(lines)


def cli_flags() -> str:
    os.environ.setdefault("NO_COLOR", "1")
    from dpo_trainer import DPOConfig, cli

    parser = cli.make_parser()
    groups = [
        ("Data flags (TRL's `ScriptArguments`)", cli.ScriptArguments),
        ("Model flags (TRL's `ModelConfig`)", cli.ModelArguments),
        ("DPO flags (`DPOConfig`'s own fields)", DPOConfig),
        ("Training flags (`transformers.TrainingArguments`)", None),
    ]
    own = set(own_field_names(DPOConfig))
    by_group: dict[str, list] = {title: [] for title, _ in groups}
    script = {f.name for f in dataclasses.fields(cli.ScriptArguments)}
    model = {f.name for f in dataclasses.fields(cli.ModelArguments)}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if action.dest in script:
            title = groups[0][0]
        elif action.dest in model:
            title = groups[1][0]
        elif action.dest in own:
            title = groups[2][0]
        else:
            title = groups[3][0]
        by_group[title].append(action)
    lines = []
    for title, _ in groups:
        actions = by_group[title]
        if not actions:
            continue
        lines += [f"### {title}", "", "| flag | default | meaning |", "|---|---|---|"]
        for action in actions:
            flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
            if action.choices:
                flags += " {" + ", ".join(str(choice) for choice in action.choices) + "}"
            default = "" if action.default in (None, dataclasses.MISSING) else f"`{action.default!r}`"
            lines.append(f"| {_cell(flags)} | {_cell(default)} | {_cell(action.help or '')} |")
        lines.append("")
    return "\n".join(lines)


def loss_registry() -> str:
    from dpo_trainer.losses import LOSSES

    lines = ["| `loss_type` | function | what it computes |", "|---|---|---|"]
    for name, function in LOSSES.items():
        summary = (inspect.getdoc(function) or "").split("\n\n")[0]
        target = f"{function.__module__}.{function.__name__}"
        lines.append(f"| `{name}` | [`{function.__name__}`][{target}] | {_cell(summary)} |")
    return "\n".join(lines)


PARTS = {"dpo-config-fields": config_fields, "cli-flags": cli_flags, "loss-registry": loss_registry}


def render(markdown: str, where: str = "") -> str:
    def part(match: re.Match) -> str:
        name = match.group(1)
        if name not in PARTS:
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{where}: no generated part named {name!r} (known: {', '.join(PARTS)})")
        return PARTS[name]()

    return MARKER.sub(part, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return render(markdown, page.file.src_uri)
