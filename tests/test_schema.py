import numpy as np
import pytest

from zoobot_hpc.schema import Schema, builtin_schema_names, load_schema

PUBLISHED_COUNTS = {  # (questions, answers) as published with Zoobot / galaxy-datasets
    "gz_decals_dr5": (10, 34),
    "gz_decals_dr8": (10, 34),
    "gz_decals_dr12": (10, 30),
    "gz_decals_all_campaigns": (30, 98),
    "gz_rings": (1, 2),
    "decals_rings": (3, 7),
}


@pytest.mark.parametrize(("name", "counts"), PUBLISHED_COUNTS.items())
def test_builtin_counts_match_published(name, counts):
    schema = load_schema(name)
    assert (len(schema.questions), len(schema.label_cols)) == counts


def test_every_builtin_loads_and_gz2_is_there():
    assert "gz2" in builtin_schema_names()
    for name in builtin_schema_names():
        schema = load_schema(name)
        assert len(set(schema.label_cols)) == len(schema.label_cols)


def test_label_columns_and_index_groups():
    schema = load_schema("gz_decals_dr5")
    assert schema.label_cols[:3] == [
        "smooth-or-featured-dr5_smooth",
        "smooth-or-featured-dr5_featured-or-disk",
        "smooth-or-featured-dr5_artifact",
    ]
    groups = schema.question_index_groups
    assert groups[0] == (0, 3) and groups[1] == (3, 5)
    assert groups[-1][1] == 34
    matrix = schema.answer_to_question_matrix
    assert matrix.shape == (34, 10) and bool((matrix.sum(dim=1) == 1).all())


def test_yes_no_answers_stay_strings(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: t\nquestions:\n  - question: ring\n    answers: [yes, no]\n    asked_after: null\n"
    )
    assert load_schema(path).label_cols == ["ring_yes", "ring_no"]


def test_reach_probability_follows_the_tree():
    schema = load_schema("decals_rings")
    # smooth 0.2, featured 0.8, artifact 0; edge-on yes 0.25 no 0.75; spiral yes 0.5 no 0.5
    fractions = np.array([[0.2, 0.8, 0.0, 0.25, 0.75, 0.5, 0.5]])
    reach = schema.reach_probability(fractions)
    np.testing.assert_allclose(reach, [[1.0, 0.8, 0.8 * 0.75]])
    answers = schema.answer_reach_probability(fractions)
    np.testing.assert_allclose(answers[0, 5], 0.8 * 0.75 * 0.5)


def test_round_trip_through_dict():
    schema = load_schema("gz2")
    assert Schema.from_dict(schema.to_dict()) == schema
