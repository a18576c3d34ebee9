"""Config pieces shared by every model entry of params.yaml (the teachers now; the model to
compress later): which architecture, its arguments, and the weights it starts from.

``ModelEntry`` is a base class: a section that names a model inherits ``arch``, ``arch_config``
and ``weights`` with their checks, and adds its own keys.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

ARCH_HELP = ("registry name (see `python -m models`), torchvision:<name>, or your own as package.module:callable "
             "(a module in user_models/)")
WEIGHTS_HELP = ("weights to start from: a file inside weights/ (a state_dict, a torchvision .pth, or a slimdeploy "
                "checkpoint), or for torchvision:<name> a torchvision weights name such as IMAGENET1K_V1, read from "
                "the torch hub cache; null: random initialisation")


def _weights_value(v: str) -> str:
    if not v.strip() or v != v.strip():
        raise ValueError("must be a file path inside weights/ or a torchvision weights name, without surrounding "
                         "spaces")
    if "\0" in v:
        raise ValueError("contains a NUL character")
    return v


# A weights reference as written in params.yaml. Which of the two kinds it is follows from its form
# (models.weights.is_weights_name); files are resolved and checked by the stage that reads them.
WeightsRef = Annotated[str, AfterValidator(_weights_value)]


class ModelEntry(BaseModel):
    """``arch`` + ``arch_config`` + optional ``weights``; unknown keys are rejected (as every
    section's are)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = Field(description=ARCH_HELP)
    arch_config: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the architecture")
    weights: WeightsRef | None = Field(None, description=WEIGHTS_HELP)

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, v: str) -> str:
        from models.registry import is_known, unknown_arch_message

        if not is_known(v):
            raise ValueError(unknown_arch_message(v))
        return v

    @model_validator(mode="after")
    def _weights_fit_arch(self) -> ModelEntry:
        from models.weights import WeightsError, is_weights_name, torchvision_weights

        if self.weights is not None and is_weights_name(self.weights):
            try:
                torchvision_weights(self.arch, self.weights)  # the name exists for this architecture
            except WeightsError as err:
                raise ValueError(f"weights: {err}") from None
        return self

    @property
    def weights_is_name(self) -> bool:
        """True when ``weights`` is a torchvision weights name, False for a file (or none)."""
        from models.weights import is_weights_name

        return self.weights is not None and is_weights_name(self.weights)
