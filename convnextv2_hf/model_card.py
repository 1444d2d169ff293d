"""Model cards of converted ConvNeXt V2 checkpoints, rendered with huggingface_hub's ``ModelCard`` from the
package's ``model_card_template.md``.

``CardFacts`` is everything a card states; ``card_facts_for_official`` fills it from the checkpoint table (the
committed cards, whose source hash is filled in at conversion time), ``conversion.card_facts_for_conversion``
from a converted file. ``write_model_cards`` regenerates the committed cards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import __version__
from .checkpoints import (
    FINETUNED_22K,
    OFFICIAL_CHECKPOINTS,
    OFFICIAL_REPOSITORY_URL,
    OfficialCheckpoint,
    format_params,
)
from .configuration_convnextv2 import PRESETS
from .recipes import FINETUNE_RECIPES

# ships inside the package (declared as package data), so an installed wheel renders cards too
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"


@dataclass
class CardFacts:
    """Everything a model card states. ``official``: one of the released files (the table's numbers apply).
    ``source_sha256`` None: a pre-generated card, whose hash is filled in at conversion time."""

    repo_id: str
    title: str
    kind: str  # "classifier", "encoder" or "pretraining"
    size: str
    depths: list[int]
    hidden_sizes: list[int]
    resolution: int
    pretraining: str
    params: str
    source: str
    official: bool = True
    num_labels: int = 1000
    acc1: float | None = None
    gflops: float | None = None
    source_sha256: str | None = None
    verification: str | None = None

    @property
    def repo_name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]

    @property
    def fine_tuned_on_22k(self) -> bool:
        return self.pretraining == FINETUNED_22K


def card_facts_for_official(checkpoint: OfficialCheckpoint, repo_id: str | None = None) -> CardFacts:
    """The facts of a released file, from the table (``repo_id`` defaults to the suggested one)."""
    preset = PRESETS[checkpoint.size]
    return CardFacts(
        repo_id=repo_id or checkpoint.repo_id(),
        title=checkpoint.title,
        kind="classifier" if checkpoint.is_classifier else "encoder",
        size=checkpoint.size,
        depths=list(preset["depths"]),
        hidden_sizes=list(preset["hidden_sizes"]),
        resolution=checkpoint.resolution,
        pretraining=checkpoint.pretraining,
        params=format_params(checkpoint.params_m),
        source=checkpoint.url,
        acc1=checkpoint.acc1,
        gflops=checkpoint.gflops,
    )


def render_model_card(facts: CardFacts, template_path: str | Path | None = None) -> ModelCard:
    """The card of ``facts``: YAML metadata (license cc-by-nc-4.0, pipeline tag, ``model-index`` with the official
    acc@1 for classifiers) and the text of ``template_path`` (default: the package's ``model_card_template.md``)."""
    template_path = Path(template_path or MODEL_CARD_TEMPLATE)
    if not template_path.is_file():
        raise ValueError(f"model card template not found at {template_path}; pass template_path")
    classifier = facts.kind == "classifier"
    eval_results = None
    if facts.acc1 is not None:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type="imagenet-1k",
                dataset_name="ImageNet-1K",
                dataset_split="validation",
                metric_type="accuracy",
                metric_name="top-1 accuracy (%)",
                metric_value=facts.acc1,
                source_name="ConvNeXt V2 official README",
                source_url=OFFICIAL_REPOSITORY_URL,
            )
        ]
    datasets = None
    if facts.official:
        datasets = ["imagenet-1k"] + (["imagenet-21k"] if facts.fine_tuned_on_22k else [])
    card_data = ModelCardData(
        license="cc-by-nc-4.0",
        library_name="transformers",
        pipeline_tag="image-classification" if classifier else "image-feature-extraction",
        tags=["vision", "convnextv2", "fcmae"] + (["image-classification"] if classifier else []),
        datasets=datasets,
        model_name=facts.repo_name,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        facts=facts,
        package_version=__version__,
        repository_url=OFFICIAL_REPOSITORY_URL,
        recipe=facts.size if facts.size in FINETUNE_RECIPES else None,
    )


def write_model_cards(directory: str | Path, namespace: str | None = None) -> list[Path]:
    """(Re)generate the card of every official checkpoint as ``directory/<repo name>.md``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for checkpoint in OFFICIAL_CHECKPOINTS:
        repo_id = checkpoint.repo_id(namespace) if namespace else None
        path = directory / f"{checkpoint.repo_name}.md"
        render_model_card(card_facts_for_official(checkpoint, repo_id)).save(path)
        paths.append(path)
    return paths


__all__ = ["MODEL_CARD_TEMPLATE", "CardFacts", "card_facts_for_official", "render_model_card", "write_model_cards"]
