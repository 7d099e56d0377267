"""AA-CLIP's prompt ensemble: state words x templates, per class real name (its
`dataset/constants.py::PROMPTS`)."""

from __future__ import annotations

NORMAL_STATES = ("{}", "a {}", "the {}")
ABNORMAL_STATES = (
    "a damaged {}",
    "a broken {}",
    "a {} with flaw",
    "a {} with defect",
    "a {} with damage",
)
TEMPLATES = ("{}.", "a photo of {}.")


def build_prompts(real_name: str) -> tuple[list[str], list[str]]:
    """Normal (6) and abnormal (10) sentences for one class, state-major as the original."""

    def expand(states: tuple[str, ...]) -> list[str]:
        return [
            template.format(state.format(real_name)) for state in states for template in TEMPLATES
        ]

    return expand(NORMAL_STATES), expand(ABNORMAL_STATES)
