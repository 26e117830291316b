"""The chat a classification prompt is made of: an instruction naming the labels, labelled
examples either listed in the system message or given as earlier chat turns, then the input.
Knows messages and strings; nothing of tokens, models or scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

EXAMPLE_FORMATS = ("list", "turns")


@dataclass
class PromptFormat:
    instruction: str | None = None  # the task; None: "Classify the input."
    answer_prefix: str = "Answer:"  # how the assistant's answer starts before the label
    input_prefix: str = ""  # what the input's text is introduced by, e.g. "Review:"
    example_format: str = "list"  # "list": examples listed in the system message; "turns": as earlier chat turns

    def system(self, labels: list[tuple[str, str]], shots: list[tuple[str, str]]) -> str:
        """labels: (name, description); shots: (text, label) in the order shown."""
        lines = [self.instruction or "Classify the input."]
        lines.append("Answer with exactly one of these labels and nothing else:")
        lines += [f"- {name}" + (f": {desc}" if desc else "") for name, desc in labels]
        text = "\n".join(lines)
        if shots and self.example_format == "list":
            text += "\n\nExamples:\n\n" + "\n\n".join(f"{self.render_input(x)}\n{self.answer(y)}" for x, y in shots)
        return text

    def render_input(self, text: str) -> str:
        return f"{self.input_prefix} {text}" if self.input_prefix else text

    def answer(self, label: str) -> str:
        """The assistant's whole answer for a label, phrased as the scored answer is."""
        return f"{self.answer_prefix} {label}" if self.answer_prefix else label

    def messages(self, labels: list[tuple[str, str]], shots: list[tuple[str, str]], text: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system(labels, shots)}]
        if self.example_format == "turns":
            for x, y in shots:
                msgs += [
                    {"role": "user", "content": self.render_input(x)},
                    {"role": "assistant", "content": self.answer(y)},
                ]
        return msgs + [{"role": "user", "content": self.render_input(text)}]
