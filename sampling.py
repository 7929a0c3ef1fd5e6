"""The sampling fields, defined once.

Completion requests take them (``schemas._Generation``) and a model's configured defaults
take the same ones (``config.SamplingDefaults``), so a parameter's name, default and bounds
live here alone, and ``request_checks.sampling_params`` passes them on by name.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class SamplingFields(BaseModel):
    """How to pick tokens. A default here is what a request gets when neither it nor its
    model's ``default`` section sets the field; a ``default`` section counts only the fields
    it sets (``model_fields_set``)."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.8, ge=0, le=10)
    top_p: float = Field(0.95, ge=0, le=1)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def stops(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


SAMPLING_FIELDS = tuple(SamplingFields.model_fields)
