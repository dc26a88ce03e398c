"""Realistic Galaxy Zoo vote counts for a schema: N volunteers at the root, each following the tree."""

from __future__ import annotations

import numpy as np

from zoobot_hpc.schema import Schema


def simulate_votes(schema: Schema, galaxies: int, root_volunteers: int = 40, seed: int = 0) -> np.ndarray:
    """(galaxies, answers) int64 counts: every question receives exactly the votes of the answer that
    leads to it (all `root_volunteers` for root questions), split multinomially by per-galaxy answer
    probabilities drawn from a flat Dirichlet; questions nobody reached get zeros."""
    rng = np.random.default_rng(seed)
    index = {column: i for i, column in enumerate(schema.label_cols)}
    votes = np.zeros((galaxies, len(schema.label_cols)), dtype=np.int64)
    done: set[str] = set()

    def fill(question) -> None:
        if question.name in done:
            return
        if question.asked_after is None:
            reached = np.full(galaxies, root_volunteers)
        else:
            fill(schema.question_of(question.asked_after))
            reached = votes[:, index[question.asked_after]]
        probabilities = rng.dirichlet(np.ones(len(question.answers)), size=galaxies)
        for g in range(galaxies):
            votes[g, question.start : question.end] = rng.multinomial(reached[g], probabilities[g])
        done.add(question.name)

    for question in schema.questions:
        fill(question)
    return votes
