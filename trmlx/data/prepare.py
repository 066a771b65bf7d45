"""From a recipe's data section to checked train/valid/test records: column mapping, type and emptiness checks,
duplicates, filters, ratio splits and multitask mixtures — with every count kept for the data summary.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from trmlx.data.chat import conversation_problem
from trmlx.data.fields import MISSING, columns_of, get_path, is_empty, placeholders, render
from trmlx.data.readers import Row, read_rows
from trmlx.errors import UserError
from trmlx.recipe.schema import OPTIONAL_ROLES, ROLE_COLUMNS, TASK_LAYOUTS, Recipe, TaskConfig

SPLITS = ("train", "valid", "test")
_NEGATIVE_COLUMN = re.compile(r"^negative(\d+)$")
_LIST_TARGETS = ("target", "completion")  # roles that may hold several gold answers (SQuAD's answers.text)


@dataclass(frozen=True)
class Record:
    """A checked example: the row's columns plus one key per role (source, target, query, ...)."""

    fields: dict[str, Any]
    origin: str
    task: str = ""
    references: tuple[str, ...] = ()  # every gold answer when the target column held a list (SQuAD answers.text)

    def reference(self) -> str | list[str]:
        """What metrics score against: all gold answers (best match counts, as in SQuAD), else the target."""
        return list(self.references) if len(self.references) > 1 else target_of(self)


@dataclass
class DataReport:
    """Everything `trmlx check` and the run log say about the data."""

    rows: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    empty_dropped: Counter = field(default_factory=Counter)  # role -> rows dropped for an empty field
    empty_negatives: int = 0
    filtered: Counter = field(default_factory=Counter)  # reason -> rows dropped by a task filter
    duplicates: Counter = field(default_factory=Counter)  # split -> exact duplicate rows found
    deduplicated: bool = False
    overlap: Counter = field(default_factory=Counter)  # split -> rows whose input also appears in train
    mixture: list[dict[str, Any]] = field(default_factory=list)
    multi_reference: Counter = field(default_factory=Counter)  # split -> rows with several gold answers
    dataset: dict[str, Any] = field(default_factory=dict)  # data.dataset: name and rows read per split

    def warnings(self) -> list[str]:
        notes = [f"dropped {n} rows with an empty '{role}' field" for role, n in self.empty_dropped.items()]
        if self.empty_negatives:
            notes.append(f"dropped {self.empty_negatives} empty negatives")
        notes += [f"dropped {n} rows: {reason}" for reason, n in self.filtered.items()]
        for split, n in self.duplicates.items():
            action = "removed" if self.deduplicated else "kept (set data.dedup = true to remove)"
            notes.append(f"{n} exact duplicate rows in {split}, {action}")
        notes += [f"{n} {split} rows have an input that also appears in train" for split, n in self.overlap.items()]
        notes += [f"{n} {split} rows have several reference answers: training uses the first, metrics take the best "
                  "match" for split, n in self.multi_reference.items()]
        return notes


@dataclass
class PreparedData:
    train: list[Record]
    valid: list[Record]
    test: list[Record]
    report: DataReport

    def split(self, name: str) -> list[Record]:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def prepare_data(recipe: Recipe) -> PreparedData:
    """Load, check, split and mix the recipe's data; raise UserError listing every bad row (up to a cap)."""
    report = DataReport(deduplicated=recipe.data.dedup)
    sources = recipe.data.tasks or [TaskConfig(name="", train=recipe.data.train, valid=recipe.data.valid,
                                               test=recipe.data.test, columns=recipe.data.columns,
                                               template=recipe.data.template)]
    per_task: dict[str, dict[str, list[Record]]] = {}
    for task in sources:
        per_task[task.name] = _load_task(recipe, task, report)
    train = _mix(recipe, sources, {name: splits["train"] for name, splits in per_task.items()}, report)
    valid = [r for splits in per_task.values() for r in splits["valid"]]
    test = [r for splits in per_task.values() for r in splits["test"]]
    seen = {input_text(r) for r in train}
    unmixed = [r for splits in per_task.values() for r in splits["train"]]
    for split, records in (("train", unmixed), ("valid", valid), ("test", test)):
        several = sum(len(r.references) > 1 for r in records)
        if several:
            report.multi_reference[split] = several
    for split, records in (("valid", valid), ("test", test)):
        overlap = sum(input_text(r) in seen for r in records)
        if overlap:
            report.overlap[split] = overlap
        for r in records:
            report.rows[split][r.task] += 1
    return PreparedData(train, valid, test, report)


def trains_on_conversations(recipe: Recipe) -> bool:
    """Whether a causal recipe trains on `messages` rows (conversations rendered with the chat template), judged
    from its first training source's rows as prepare_data would map them: generate then sends a prompt as a user
    turn. Data this machine cannot read count as plain text (generate needs no data)."""
    if recipe.task != "causal":
        return False
    data = recipe.data
    task = (data.tasks or [TaskConfig(name="", train=data.train, columns=data.columns, template=data.template)])[0]
    columns = {**data.columns, **task.columns}
    if "messages" in columns:
        return True
    files = [task.train] if isinstance(task.train, str) else list(task.train)
    try:
        if files and files[0]:
            rows = read_rows(files[0])
        elif not data.dataset:
            return False
        else:
            from trmlx.data.hub import read_dataset_splits

            rows = read_dataset_splits(data.dataset, data.dataset_config, {"train": data.dataset_split}).rows["train"]
        header = list(dict.fromkeys(k for row in rows[:50] for k in columns_of(row.values)))
        roles = _resolve_roles("causal", header, columns, rows[0].origin, bool(task.template or data.template))
    except (UserError, OSError, IndexError, KeyError):
        return False
    return "messages" in roles


def target_of(record: Record) -> str:
    """The text trained on as the answer (the first gold answer when there are several)."""
    f = record.fields
    if f.get("messages"):  # a conversation is scored on its last assistant turn
        return f["messages"][-1]["content"]
    return f.get("target", f.get("completion", f.get("positive", "")))


def input_text(record: Record) -> str:
    """The text a model reads for this record, used for overlap checks and length statistics."""
    f = record.fields
    for role in ("source", "prompt", "input", "query"):
        if role in f:
            return f[role]
    return json.dumps(f.get("messages", ""), ensure_ascii=False)


def _load_task(recipe: Recipe, task: TaskConfig, report: DataReport) -> dict[str, list[Record]]:
    data = recipe.data
    columns = {**data.columns, **task.columns}
    template = task.template or data.template
    loaded: dict[str, list[Record]] = {}
    hub = _read_dataset(data, task, report) if data.dataset else {}
    for split in SPLITS:
        files = getattr(task, split)
        files = [files] if isinstance(files, str) else files
        rows: list[Row] = list(hub.get(split, []))
        for path in filter(None, files):
            rows += read_rows(path, split=split)
        loaded[split] = _clean(recipe, task, split, _to_records(recipe.task, rows, columns, template, task.name),
                               report)
    # Ratios are shares of the whole training file, cut from one seeded shuffle so the splits are disjoint.
    pool = loaded["train"]
    order = list(range(len(pool)))
    random.Random(data.split_seed).shuffle(order)
    taken: set[int] = set()
    for split, ratio in (("valid", data.valid_ratio), ("test", data.test_ratio)):
        if ratio and not loaded[split] and pool:
            cut = order[len(taken) : len(taken) + max(1, round(len(pool) * ratio))]
            taken.update(cut)
            loaded[split] = [pool[i] for i in sorted(cut)]
    loaded["train"] = [r for i, r in enumerate(pool) if i not in taken]
    return loaded


def _read_dataset(data: Any, task: TaskConfig, report: DataReport) -> dict[str, list[Row]]:
    """The data.dataset splits that feed our splits: train always, valid/test only where no files are given."""
    from trmlx.data.hub import read_dataset_splits

    wanted = {"train": data.dataset_split,
              "valid": "" if task.valid else data.dataset_valid_split,
              "test": "" if task.test else data.dataset_test_split}
    splits = read_dataset_splits(data.dataset, data.dataset_config, wanted)
    report.dataset = {"name": data.dataset, "config": data.dataset_config, "available": splits.available,
                      "splits": {ours: {"split": splits.source[ours], "rows": len(splits.rows[ours])}
                                 for ours in SPLITS if ours in splits.source}}
    return splits.rows


def _to_records(kind: str, rows: list[Row], mapping: dict[str, str], template: str, task: str) -> list[Record]:
    """Map columns (dotted paths reach into nested objects) to roles and check types; every problem names the
    file and line."""
    if not rows:
        return []
    header = list(dict.fromkeys(k for row in rows[:50] for k in columns_of(row.values)))
    roles = _resolve_roles(kind, header, mapping, rows[0].origin, bool(template))
    negative_columns = sorted((c for c in header if _NEGATIVE_COLUMN.match(c)),
                              key=lambda c: int(_NEGATIVE_COLUMN.match(c).group(1)))
    used = placeholders(template)
    unknown = [name for name in used if name not in header and name not in roles
               and all(get_path(row.values, name) is MISSING for row in rows[:50])]  # e.g. {answers.text.0}
    if unknown:
        file = rows[0].origin.rsplit(":", 1)[0]
        raise UserError(f"{file}: the template uses {{{unknown[0]}}} but there is no such column; "
                        f"columns present: {', '.join(header)}")
    records, errors = [], []
    for row in rows:
        values, references = dict(row.values), ()
        for role, column in roles.items():
            value = get_path(row.values, column)
            if value is MISSING and role == "negatives":  # per row: a row without the field has none
                continue
            if value is MISSING:
                errors.append(f"{row.origin}: missing field '{column}'" + _role_note(role, column))
                break
            problem = _type_problem(role, value)
            if problem:
                errors.append(f"{row.origin}: field '{column}' {problem}")
                break
            if role in _LIST_TARGETS and isinstance(value, list):  # several gold answers: train on the first
                references = tuple(dict.fromkeys(v for v in value if v and v.strip()))
                value = references[0] if references else ""
            values[role] = value
        else:
            missing = next((name for name in used if get_path(values, name) is MISSING), None)
            if missing:  # a late row may lack a column the first rows had
                errors.append(f"{row.origin}: missing field '{missing}' (used by the template)")
                continue
            first = TASK_LAYOUTS[kind][0]
            if template and first[0] not in roles and all(r in roles for r in first[1:]):
                values[first[0]] = render(template, values)  # the template builds the input role from columns
            if negative_columns and "negatives" not in roles:
                values["negatives"] = [row.values[c] or "" for c in negative_columns]
            records.append(Record(values, row.origin, task or str(values.get("task", "") or ""), references))
        if len(errors) > 20:
            break
    if errors:
        raise UserError(errors[:20] + ([f"... and more bad rows in {rows[0].origin.rsplit(':', 1)[0]}"]
                                       if len(errors) > 20 else []))
    return records


def _resolve_roles(kind: str, header: list[str], mapping: dict[str, str], origin: str,
                   has_template: bool) -> dict[str, str]:
    """Pick the first row layout whose roles all have a column (explicit mapping first, then known names).

    With a template, the layout's input role (source, input, ...) may be missing: the template builds it.
    """

    def column_for(role: str) -> str | None:  # header holds nested paths too (translation.en)
        if role in mapping:
            return mapping[role]
        return next((c for c in ROLE_COLUMNS.get(role, (role,)) if c in header), None)

    layouts = TASK_LAYOUTS[kind]
    if mapping:  # an explicit mapping chooses the layout it names
        layouts = tuple(lay for lay in layouts if set(mapping) & set(lay)) or layouts
    for layout in layouts:
        found = {role: column_for(role) for role in layout}
        if has_template and layout == TASK_LAYOUTS[kind][0] and found[layout[0]] not in header:
            del found[layout[0]]
        if found and all(c in header for c in found.values()):
            for role in OPTIONAL_ROLES[kind]:
                column = column_for(role)
                if column and column in header:
                    found[role] = column
            return found
    layout = layouts[0][1:] if has_template else layouts[0]
    missing = [role for role in layout if (column_for(role) or role) not in header]
    role = missing[0]
    column = column_for(role) or role
    file = origin.rsplit(":", 1)[0]
    raise UserError(f"{file}: missing column '{column}'{_role_note(role, column)}; columns present: "
                    f"{', '.join(header)}; map yours with data.columns.{role} = \"...\"")


def _role_note(role: str, column: str) -> str:
    return f" (the {role} role)" if role != column else ""


def _type_problem(role: str, value: Any) -> str | None:
    if role == "messages":
        ok = isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                             and isinstance(m.get("role"), str) for m in value)
        return conversation_problem(value) if ok else "should be a list of {role, content} messages"
    if role == "negatives":
        ok = isinstance(value, list) and all(isinstance(v, str) or v is None for v in value)
        return None if ok else f"should be a list of texts, got {_kind(value)}"
    if value is None or isinstance(value, str):
        return None
    if role in _LIST_TARGETS and isinstance(value, list):
        if all(isinstance(v, str) or v is None for v in value):
            return None
        return f"should be text or a list of texts, got {_kind(value)} {value!r}"[:200]
    return f"should be text, got {_kind(value)} {value!r}"[:200]


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", list: "list", dict: "object"}.get(type(value),
                                                                                                type(value).__name__)


def _clean(recipe: Recipe, task: TaskConfig, split: str, records: list[Record], report: DataReport) -> list[Record]:
    """Drop or reject empty fields, apply the task's length filters, count (and maybe drop) duplicates."""
    kept, seen = [], Counter()
    content_roles = [r for layout in TASK_LAYOUTS[recipe.task] for r in layout]
    # A null or blank template field is an empty field like any other (it would otherwise render as "None").
    filled = [p for p in placeholders(task.template or recipe.data.template) if p not in content_roles]
    for record in records:
        f = record.fields
        empty = next((r for r in content_roles if r in f and is_empty(f[r])), None)
        empty = empty or next((p for p in filled if is_empty(get_path(f, p))), None)
        if not empty and any(m["role"] == "assistant" and is_empty(m["content"]) for m in f.get("messages", ())):
            empty = "messages"  # a blank assistant turn teaches nothing but to stop at once
        if empty:
            if recipe.data.on_empty == "error":
                raise UserError(f"{record.origin}: empty field '{empty}' (set data.on_empty = \"drop\" to skip "
                                "such rows)")
            report.empty_dropped[empty] += 1
            continue
        if "negatives" in f:
            negatives = [n for n in f["negatives"] if n and n.strip()]
            report.empty_negatives += len(f["negatives"]) - len(negatives)
            record = dataclasses.replace(record, fields={**f, "negatives": negatives})
        target = target_of(record)
        if task.min_target_chars and len(target.strip()) < task.min_target_chars:
            report.filtered[f"target shorter than {task.min_target_chars} characters"] += 1
            continue
        if task.min_input_chars and len(input_text(record).strip()) < task.min_input_chars:
            report.filtered[f"input shorter than {task.min_input_chars} characters"] += 1
            continue
        key = json.dumps([f.get(r) for r in content_roles if r in f], ensure_ascii=False)
        seen[key] += 1
        if seen[key] > 1:
            report.duplicates[split] += 1
            if recipe.data.dedup:
                continue
        kept.append(record)
    return kept


def _mix(recipe: Recipe, tasks: list[TaskConfig], train: dict[str, list[Record]], report: DataReport) -> list[Record]:
    """Upsample each task, then draw the training mixture by proportion, temperature or weight (seeded)."""
    rng = random.Random(recipe.train.seed)
    pools = {}
    for task in tasks:
        rows = train[task.name]
        whole, fraction = divmod(task.upsample, 1)
        pool = rows * int(whole) + rng.sample(rows, round(len(rows) * fraction))
        pools[task.name] = pool
    total = sum(len(p) for p in pools.values())
    data = recipe.data
    if data.mixture == "proportional" or len(tasks) == 1:
        shares = {t.name: len(pools[t.name]) / max(total, 1) for t in tasks}
    else:
        raw = {t.name: (t.weight if data.mixture == "weights" else len(pools[t.name]) ** (1 / data.temperature))
               for t in tasks}
        shares = {name: w / (sum(raw.values()) or 1) for name, w in raw.items()}
    mixed: list[Record] = []
    for task in tasks:
        pool, drawn = pools[task.name], round(total * shares[task.name])
        chosen = pool if drawn == len(pool) else _draw(pool, drawn, rng)
        mixed += chosen
        report.rows["train"][task.name] += len(chosen)
        if task.name:
            report.mixture.append({"task": task.name, "rows": len(train[task.name]), "upsample": task.upsample,
                                   "drawn": len(chosen), "share": round(len(chosen) / max(total, 1), 4)})
    return mixed


def _draw(pool: list[Record], count: int, rng: random.Random) -> list[Record]:
    """`count` records from `pool`: whole shuffled passes, then a random part of one more pass."""
    if not pool:
        return []
    out: list[Record] = []
    while len(out) + len(pool) <= count:
        out += rng.sample(pool, len(pool))
    return out + rng.sample(pool, count - len(out))
