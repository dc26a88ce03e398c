"""Property tests: the schema and catalog parsers and the loss, on inputs hypothesis makes up.

Schemas are random decision trees; catalogs are random tables with random bad cells written to real
CSV files; votes and concentrations are anything valid. Each property runs ~50 examples.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoobot_hpc.catalog import _all_distinct, absolute_paths, files_exist, find_problems, read_catalog
from zoobot_hpc.config import dump_yaml
from zoobot_hpc.loss import dirichlet_multinomial_nll
from zoobot_hpc.schema import Schema, SchemaError, load_schema

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# answer names include YAML 1.1 booleans, null and a number: they must stay strings through YAML
ANSWERS = ["yes", "no", "on", "off", "null", "1", "smooth", "featured-or-disk", "artifact", "a b"]


# -------------------------------------------------------------------------------------- schemas
@st.composite
def trees(draw: st.DrawFn, max_questions: int = 6) -> dict:
    """A valid schema in the YAML layout: each question is asked after an answer of an earlier-drawn
    question (or always), then the questions are shuffled, so parents may come later in the file."""
    n = draw(st.integers(1, max_questions))
    questions = []
    for i in range(n):
        answers = draw(st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=4, unique=True))
        parents = [f"{q['question']}_{a}" for q in questions for a in q["answers"]]
        asked_after = draw(st.sampled_from([None, *parents])) if parents else None
        questions.append({"question": f"q{i}", "answers": answers, "asked_after": asked_after})
    return {"name": "random", "questions": draw(st.permutations(questions))}


@FAST
@given(tree=trees())
def test_random_trees_round_trip_through_yaml(tree):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "schema.yaml"
        path.write_text(dump_yaml(tree))
        schema = load_schema(path)
    assert schema.to_dict() == tree
    assert schema.label_cols == [f"{q['question']}_{a}" for q in tree["questions"] for a in q["answers"]]
    assert Schema.from_dict(schema.to_dict()) == schema


@FAST
@given(tree=trees(), data=st.data())
def test_reach_is_the_parent_reach_times_the_answer_fraction(tree, data):
    schema = Schema.from_dict(tree)
    answers = len(schema.label_cols)
    raw = np.array(data.draw(st.lists(st.floats(0.01, 1), min_size=answers, max_size=answers)))
    groups = schema.answer_to_question_matrix.numpy().astype(np.float64)
    fractions = raw / (raw @ groups @ groups.T)  # each question's fractions sum to 1
    reach = schema.reach_probability(fractions[None])[0]
    index = {c: i for i, c in enumerate(schema.label_cols)}
    for j, question in enumerate(schema.questions):
        if question.asked_after is None:
            assert reach[j] == 1
        else:
            parent = schema.question_names.index(schema.question_of(question.asked_after).name)
            assert reach[j] == pytest.approx(reach[parent] * fractions[index[question.asked_after]])


def _mutated(tree: dict, kind: str, data: st.DataObject) -> tuple[dict, list[str]]:
    """`tree` with one defect of `kind`, and the words the error must contain."""
    questions = [dict(q, answers=list(q["answers"])) for q in tree["questions"]]
    victim = data.draw(st.sampled_from(questions))
    if kind == "unknown parent":
        victim["asked_after"] = "nowhere_maybe"
        return {**tree, "questions": questions}, [
            repr(victim["question"]),
            "'nowhere_maybe'",
            "label columns",
        ]
    if kind == "duplicate answer":
        victim["answers"].append(data.draw(st.sampled_from(victim["answers"])))
        column = f"{victim['question']}_{victim['answers'][-1]}"
        return {**tree, "questions": questions}, [f"duplicate answer {column!r}", "rename"]
    # a cycle: the root above the victim is made to follow one of the victim's answers
    by_column = {f"{q['question']}_{a}": q for q in questions for a in q["answers"]}
    root = victim
    while root["asked_after"] is not None:
        root = by_column[root["asked_after"]]
    root["asked_after"] = f"{victim['question']}_{victim['answers'][0]}"
    return {**tree, "questions": questions}, ["cycle", f"{victim['question']} ->", "change the asked_after"]


@FAST
@given(tree=trees(), kind=st.sampled_from(["unknown parent", "duplicate answer", "cycle"]), data=st.data())
def test_random_defects_are_rejected_naming_the_entry(tree, kind, data):
    broken, words = _mutated(tree, kind, data)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "schema.yaml"
        path.write_text(dump_yaml(broken))
        with pytest.raises(SchemaError) as info:
            load_schema(path)
    assert all(w in str(info.value) for w in words), (words, str(info.value))


# ------------------------------------------------------------------------------------- catalogs
SCHEMA = load_schema("decals_rings")
BAD_CELLS = {  # value written to a CSV cell -> the kind of problem find_problems must report
    "nan": (np.nan, "missing (NaN) votes in {} (use 0 for a question not asked)"),
    "negative": (-3, "negative votes in {}"),
    "fraction": (2.5, "non-integer votes in {} (give counts, not fractions)"),
    "text": ("many", "non-numeric votes in {}"),
}
LOCS = {
    "small/g1.jpg": True,
    "big/g7.jpg": True,
    "small/gone.jpg": False,
    "big/sub": False,
    "nowhere/g1.jpg": False,
}
NO_VOTES = "no votes at all (the model would learn nothing; are these the vote count columns?)"


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory) -> Path:
    """Real files for existence checks: a small folder, and a big one that catalogs use a little of."""
    root = tmp_path_factory.mktemp("catalog_files")
    for name, count in (("small", 5), ("big", 120)):
        (root / name / "sub").mkdir(parents=True)
        for i in range(count):
            (root / name / f"g{i}.jpg").write_bytes(b"x")
    return root


@st.composite
def catalogs(draw: st.DrawFn) -> tuple[pd.DataFrame, dict[str, set[int]]]:
    """A catalog with random votes, bad cells, duplicate ids, missing and empty paths, and the rows of
    each problem kind find_problems must report."""
    n = draw(st.integers(1, 30))
    votes = draw(st.lists(st.lists(st.integers(0, 50), min_size=7, max_size=7), min_size=n, max_size=n))
    frame = pd.DataFrame(votes, columns=SCHEMA.label_cols).astype(object)
    cells = st.tuples(
        st.integers(0, n - 1), st.sampled_from(SCHEMA.label_cols), st.sampled_from(list(BAD_CELLS))
    )
    bad_cells = {(row, column): bad for row, column, bad in draw(st.lists(cells, max_size=8))}  # last wins
    expected: dict[str, set[int]] = {}
    for (row, column), bad in bad_cells.items():
        value, kind = BAD_CELLS[bad]
        frame.loc[row, column] = value
        expected.setdefault(kind.format(column), set()).add(row)
    if not bad_cells and not frame.to_numpy().any():
        expected[NO_VOTES] = set()
    ids = [f"G{i}" for i in range(n)]
    for a, b in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3)):
        ids[b] = ids[a]
    for row in draw(st.lists(st.integers(0, n - 1), max_size=2)):
        ids[row] = ""
    expected["empty id_str (give every galaxy an id)"] = {i for i, name in enumerate(ids) if not name}
    expected["duplicate id_str (ids must be unique)"] = set(
        np.flatnonzero(pd.Series(ids).duplicated(keep=False) & (pd.Series(ids) != ""))
    )
    locs = draw(st.lists(st.sampled_from([*LOCS, ""]), min_size=n, max_size=n))
    expected["image files that do not exist"] = {i for i, loc in enumerate(locs) if loc and not LOCS[loc]}
    expected["empty file_loc"] = {i for i, loc in enumerate(locs) if not loc}
    frame.insert(0, "id_str", ids)
    frame.insert(1, "file_loc", locs)
    return frame, {kind: rows for kind, rows in expected.items() if rows or kind == NO_VOTES}


@FAST
@given(case=catalogs())
def test_find_problems_reports_exactly_the_bad_rows(image_folders, case):
    frame, expected = case
    path = image_folders / "catalog.csv"  # file_loc are relative to it
    frame.to_csv(path, index=False)
    problems = find_problems(read_catalog(path), SCHEMA, str(path))
    reported = {}
    for kind, items in problems.kinds.items():
        rows = [int(m[1]) for m in (re.match(r"row (\d+)", item) for item in items) if m]
        assert len(rows) == len(set(rows)), (kind, items)  # each row once
        reported[kind] = set(rows)
    assert reported == expected


@FAST
@given(
    ids=st.lists(st.one_of(st.none(), st.text("ab é", max_size=3)), max_size=30),
    in_order=st.booleans(),
)
def test_distinct_id_check_agrees_with_a_set(ids, in_order):
    """Both ways of proving ids distinct (neighbours in order; a hash pass) agree with a set."""
    if in_order:  # in order but for the nulls, which stay where they were
        ordered = iter(sorted(i for i in ids if i is not None))
        ids = [None if i is None else next(ordered) for i in ids]
    assert _all_distinct(pa.array(ids, pa.large_string())) == (len(set(ids)) == len(ids))


# ---------------------------------------------------------------------------------------- paths
SEGMENTS = ["a", "b.jpg", "..", ".", "", "c d", "é"]
RELATIVE = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map("/".join)


@FAST
@given(
    paths=st.lists(st.one_of(st.none(), RELATIVE, RELATIVE.map(lambda p: "/" + p)), max_size=30),
    base=st.sampled_from(["/data/catalogs", "/", "/x/y/z", "/données/c d"]),
)
def test_absolute_paths_joins_relative_paths_to_the_base(paths, base):
    got = absolute_paths(pd.Series(paths, dtype=object), Path(base))
    for path, result in zip(paths, got, strict=True):
        if path is None:
            assert pd.isna(result)
        elif not path or path.startswith("/"):
            assert result == path
        else:
            assert result == os.path.join(base, path)


PICKS = ["small/g0.jpg", "small/g9.jpg", "big/g3.jpg", "big/g200.jpg", "big/sub", "nowhere/g0.jpg",
         "small//g1.jpg", "small/./g2.jpg", "big/../small/g3.jpg"]  # fmt: skip


@FAST
@given(picks=st.lists(st.sampled_from(PICKS), min_size=1, max_size=20))
def test_files_exist_agrees_with_isfile(image_folders, picks):
    """Whether folders are listed (many rows) or their rows stat'ed (a big folder, few rows)."""
    paths = [f"{image_folders}/{p}" for p in picks]
    exists = files_exist(pa.array(paths, pa.large_string()), np.ones(len(paths), dtype=bool))
    assert exists.tolist() == [os.path.isfile(p) for p in paths]


# ----------------------------------------------------------------------------------------- loss
@st.composite
def votes_and_concentrations(draw: st.DrawFn) -> tuple[Schema, torch.Tensor, torch.Tensor]:
    schema = Schema.from_dict(draw(trees(max_questions=5)))
    n, answers = draw(st.integers(1, 6)), len(schema.label_cols)
    votes = draw(st.lists(st.integers(0, 2000), min_size=n * answers, max_size=n * answers))
    zero_questions = draw(st.lists(st.integers(0, len(schema.questions) - 1), max_size=3))
    votes = torch.tensor(votes).reshape(n, answers)
    for j in zero_questions:  # unasked questions: every answer 0
        start, end = schema.question_index_groups[j]
        votes[:, start:end] = 0
    concentrations = draw(st.lists(st.floats(1.0, 101.0), min_size=n * answers, max_size=n * answers))
    return schema, votes, torch.tensor(concentrations).reshape(n, answers)


@FAST
@given(case=votes_and_concentrations())
def test_loss_is_finite_non_negative_and_zero_for_unasked_questions(case):
    schema, votes, concentrations = case
    concentrations.requires_grad_(True)
    loss = dirichlet_multinomial_nll(concentrations, votes, schema.answer_to_question_matrix)
    assert loss.shape == (len(votes), len(schema.questions))
    assert bool(torch.isfinite(loss).all()) and bool((loss >= -1e-4).all())  # -log of a probability
    asked = (votes.double() @ schema.answer_to_question_matrix.double()) > 0
    assert bool((loss[~asked] == 0).all())
    loss.sum().backward()
    assert bool(torch.isfinite(concentrations.grad).all())
    unasked_answers = (~asked).double() @ schema.answer_to_question_matrix.double().T > 0
    assert bool((concentrations.grad[unasked_answers] == 0).all())


@FAST
@given(case=votes_and_concentrations())
def test_loss_of_a_batch_is_the_loss_of_each_galaxy(case):
    schema, votes, concentrations = case
    batch = dirichlet_multinomial_nll(concentrations, votes, schema.answer_to_question_matrix)
    groups = schema.answer_to_question_matrix
    one_by_one = torch.cat(
        [
            dirichlet_multinomial_nll(c[None], v[None], groups)
            for c, v in zip(concentrations, votes, strict=True)
        ]
    )
    torch.testing.assert_close(batch, one_by_one)
