"""Decision-tree schemas: which questions volunteers answered, and which answer leads to which question.

A schema is read from YAML (built-in ones live in `zoobot_hpc/schemas/`). Answers are indexed in file
order, so the label columns `{question}_{answer}` and the model's outputs line up one to one.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from zoobot_hpc.errors import InputError

ENTRY_KEYS = ("question", "answers", "asked_after")


class SchemaError(InputError):
    """A schema file or definition is malformed; the message names the entry."""


def _suggestion(name: str, valid: Sequence[str]) -> str:
    """' (did you mean X?)' for the closest valid name, preferring a column that ends in `name`."""
    ending = [v for v in valid if v.endswith(f"_{name}")]
    close = ending or difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Question:
    name: str
    answers: tuple[str, ...]
    start: int  # index of the first answer among all answers of the schema
    asked_after: str | None  # label column of the answer that leads here; None for a root question

    @property
    def end(self) -> int:
        return self.start + len(self.answers)

    @property
    def label_cols(self) -> list[str]:
        return [f"{self.name}_{answer}" for answer in self.answers]


class Schema:
    """Questions, their answers and the tree that links them.

    `pairs` maps each question to its answers (in order); `dependencies` maps each question to the
    label column (`{question}_{answer}`) of the answer that leads to it, or None if always asked.
    """

    def __init__(
        self,
        pairs: Mapping[str, Sequence[str]],
        dependencies: Mapping[str, str | None],
        name: str = "custom",
    ) -> None:
        self.name = name
        questions: list[Question] = []
        start = 0
        seen_columns: set[str] = set()
        for question, answers in pairs.items():
            if not isinstance(question, str) or not question:
                raise SchemaError(f"schema {name}: question name {question!r} must be a non-empty string")
            if not answers:
                raise SchemaError(f"schema {name}: question {question!r} has no answers; list them")
            for answer in answers:
                if not isinstance(answer, str) or not answer:
                    raise SchemaError(
                        f"schema {name}: answer {answer!r} of question {question!r} must be a non-empty "
                        "string (quote it in YAML)"
                    )
                column = f"{question}_{answer}"
                if column in seen_columns:
                    raise SchemaError(
                        f"schema {name}: duplicate answer {column!r} in question {question!r}; every "
                        "label column {question}_{answer} must be unique: remove or rename one"
                    )
                seen_columns.add(column)
            if question not in dependencies:
                raise SchemaError(
                    f"schema {name}: question {question!r} has no asked_after entry "
                    "(use null for a question that is always asked)"
                )
            questions.append(Question(question, tuple(answers), start, dependencies[question]))
            start += len(answers)
        if not questions:
            raise SchemaError(f"schema {name}: it has no questions")
        self.questions: tuple[Question, ...] = tuple(questions)
        self._check_tree(seen_columns)

    def _check_tree(self, columns: set[str]) -> None:
        parent_question = {}
        for question in self.questions:
            if question.asked_after is None:
                continue
            if question.asked_after not in columns:
                raise SchemaError(
                    f"schema {self.name}: question {question.name!r} is asked after unknown answer "
                    f"{question.asked_after!r}; it must be one of the label columns ({{question}}_{{answer}})"
                    f"{_suggestion(str(question.asked_after), sorted(columns))}"
                )
            parent_question[question.name] = self.question_of(question.asked_after).name
        for question in self.questions:
            path = [question.name]
            current = question.name
            while current in parent_question:
                current = parent_question[current]
                if current in path:
                    cycle = " -> ".join([*path, current])
                    raise SchemaError(
                        f"schema {self.name}: the questions form a cycle: {cycle}; change the asked_after "
                        "of one of them to an answer outside the cycle (or null for a question always asked)"
                    )
                path.append(current)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "custom") -> Schema:
        """From the YAML layout: `{name, questions: [{question, answers, asked_after}, ...]}`."""
        name = data.get("name", name) if isinstance(data, Mapping) else name
        entries = data.get("questions") if isinstance(data, Mapping) else None
        if not isinstance(entries, list) or not entries:
            raise SchemaError(f"schema {name}: expected a non-empty 'questions' list")
        pairs: dict[str, list[str]] = {}
        dependencies: dict[str, str | None] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or "question" not in entry:
                raise SchemaError(f"schema {name}: questions[{i}] needs 'question', 'answers', 'asked_after'")
            question = entry["question"]
            unknown = [str(k) for k in entry if k not in ENTRY_KEYS]
            if unknown:
                raise SchemaError(
                    f"schema {name}: question {question!r} has unknown key {unknown[0]!r}"
                    f"{_suggestion(unknown[0], ENTRY_KEYS)}; its keys are {', '.join(ENTRY_KEYS)}"
                )
            if question in pairs:
                raise SchemaError(f"schema {name}: question {question!r} is defined twice; merge or rename")
            answers = entry.get("answers") or []
            if not isinstance(answers, list):
                raise SchemaError(f"schema {name}: answers of {question!r} must be a list")
            pairs[question] = answers
            dependencies[question] = entry.get("asked_after")
        return cls(pairs, dependencies, name=name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "questions": [
                {"question": q.name, "answers": list(q.answers), "asked_after": q.asked_after}
                for q in self.questions
            ],
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self.questions == other.questions

    def __hash__(self) -> int:
        return hash(self.questions)

    def __repr__(self) -> str:
        return f"Schema({self.name!r}, {len(self.questions)} questions, {len(self.label_cols)} answers)"

    @cached_property
    def label_cols(self) -> list[str]:
        return [column for question in self.questions for column in question.label_cols]

    @property
    def question_names(self) -> list[str]:
        return [q.name for q in self.questions]

    @cached_property
    def question_index_groups(self) -> list[tuple[int, int]]:
        """(start, end) answer index range of each question, end exclusive."""
        return [(q.start, q.end) for q in self.questions]

    @cached_property
    def answer_to_question_matrix(self) -> torch.Tensor:
        """(answers, questions) one-hot matrix: sums per-answer values into per-question values."""
        matrix = torch.zeros(len(self.label_cols), len(self.questions))
        for j, question in enumerate(self.questions):
            matrix[question.start : question.end, j] = 1.0
        return matrix

    def question_of(self, label_col: str) -> Question:
        for question in self.questions:
            if label_col in question.label_cols:
                return question
        raise KeyError(label_col)

    def reach_probability(self, fractions: np.ndarray) -> np.ndarray:
        """Probability that each question is asked, given per-answer vote fractions.

        `fractions` is (galaxies, answers), each question's fractions summing to 1; the result is
        (galaxies, questions): the product of the fractions of the answers on the path from the root.
        """
        fractions = np.asarray(fractions, dtype=np.float64)
        reach: dict[str, np.ndarray] = {}
        index = {column: i for i, column in enumerate(self.label_cols)}

        def of(question: Question) -> np.ndarray:
            if question.name not in reach:
                if question.asked_after is None:
                    reach[question.name] = np.ones(fractions.shape[0])
                else:
                    parent = self.question_of(question.asked_after)
                    reach[question.name] = of(parent) * fractions[:, index[question.asked_after]]
            return reach[question.name]

        return np.stack([of(q) for q in self.questions], axis=1)

    def answer_reach_probability(self, fractions: np.ndarray) -> np.ndarray:
        """Probability of each answer being given: reach of its question times its fraction."""
        reach = self.reach_probability(fractions)
        per_answer = np.concatenate(
            [np.repeat(reach[:, [j]], len(q.answers), axis=1) for j, q in enumerate(self.questions)], axis=1
        )
        return per_answer * np.asarray(fractions, dtype=np.float64)


class _StringBooleansLoader(yaml.SafeLoader):
    """YAML loader that keeps yes/no/on/off as strings: they are answer names, not booleans."""


_StringBooleansLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def builtin_schema_names() -> list[str]:
    folder = resources.files("zoobot_hpc") / "schemas"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_schema(schema: str | Path | Schema | Mapping[str, Any]) -> Schema:
    """A built-in schema by name, a YAML file by path, a dict in the YAML layout, or a Schema as is."""
    if isinstance(schema, Schema):
        return schema
    if isinstance(schema, Mapping):
        return Schema.from_dict(schema)
    text_name = str(schema)
    if not text_name:
        raise SchemaError(
            f"no schema given: set schema to a built-in name ({', '.join(builtin_schema_names())}) "
            "or the path of a YAML file"
        )
    if text_name in builtin_schema_names():
        text = (resources.files("zoobot_hpc") / "schemas" / f"{text_name}.yaml").read_text()
        return _parse(text, text_name)
    path = Path(schema)
    if path.is_file():
        return _parse(path.read_text(), str(path))
    raise SchemaError(
        f"schema {text_name!r} is neither a built-in schema ({', '.join(builtin_schema_names())}) "
        f"nor an existing YAML file{_suggestion(text_name, builtin_schema_names())}"
    )


def _parse(text: str, source: str) -> Schema:
    try:
        data = yaml.load(text, Loader=_StringBooleansLoader)
    except yaml.YAMLError as err:
        raise SchemaError(f"schema {source} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise SchemaError(f"schema {source}: expected a mapping with 'name' and 'questions'")
    return Schema.from_dict(data, name=data.get("name", source))
