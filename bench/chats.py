"""Deterministic chat histories for the real-model figures: the same messages on every run.

A conversation is a topic and a seeded generator of plain English exchanges (a user
question, an assistant answer of a few sentences). ``history`` gives the first
``pairs`` exchanges and the next question: fixed text, not what a model generated, so
every server starts from exactly the same prompt. ``question`` gives the questions of
later turns, for as many turns as wanted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

Message = dict[str, str]

SUBJECTS = ("the old lighthouse", "a small garden", "the river boat", "our kitchen", "the village school",
            "a mountain trail", "the night market", "an empty library", "the harbour crane", "a winter forest")
VERBS = ("keeps", "changes", "hides", "needs", "shows", "follows", "holds", "welcomes", "remembers", "shapes")
OBJECTS = ("the morning light", "three careful steps", "a quiet routine", "every visitor", "the evening tide",
           "warm bread", "a forgotten map", "the weekly plan", "fresh water", "a patient hand")
ENDINGS = ("before the rain starts", "when the bells ring", "after a long week", "during the busy season",
           "without any fuss", "for the whole family", "at the end of the day", "in spite of the wind",
           "with a little help", "as it always did")
QUESTIONS = ("What happens next with {t}?", "Can you explain more about {t}?", "Why does {t} matter so much?",
             "How would you describe {t} to a child?", "What is the hardest part of {t}?",
             "Is there a simple rule for {t}?")


@dataclass(frozen=True)
class Conversation:
    """One conversation's messages; ``seed`` makes two conversations differ from the first word."""

    topic: str
    seed: int
    sentences: int = 4  # per assistant answer

    def question(self, index: int) -> str:
        rng = random.Random(self.seed * 100_003 + index)
        return f"({index + 1}) " + rng.choice(QUESTIONS).format(t=self.topic)

    def answer(self, index: int) -> str:
        rng = random.Random(self.seed * 200_003 + index)
        return " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                        f"{rng.choice(ENDINGS)}." for _ in range(self.sentences))

    def history(self, pairs: int) -> list[Message]:
        """``pairs`` question-answer exchanges, then question ``pairs`` (awaiting its answer)."""
        messages: list[Message] = []
        for index in range(pairs):
            messages += [{"role": "user", "content": self.question(index)},
                         {"role": "assistant", "content": self.answer(index)}]
        return [*messages, {"role": "user", "content": self.question(pairs)}]


CONVERSATIONS = (Conversation("planning a garden", seed=1), Conversation("repairing a bicycle", seed=2))
