"""The MLflow Model Registry and the quality gate: register a logged student, promote it only if it is better.

Each call registers the logged model as a new version of a registered model, then evaluates it and the current
`champion` on the same labelled texts, both loaded through pyfunc (one code path, no stored metrics from other test
sets). The alias `champion` moves to the new version only if the version keeps at least `min_retention` of the
teacher's accuracy and beats the champion; otherwise the version gets the alias `challenger`. The decision is recorded
as tags on the model version and on the run.

Like `log_student_model`, this sets MLflow's process-wide tracking URI: `models:/NAME@ALIAS` is resolved through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sparse_distill.mlflow_model import LABEL_COLUMN, TEXT_COLUMN

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PREFIX = "sparse_distill."
RUN_TAG_PREFIX = "sparse_distill.registry."
# The logged model's list of registry versions, as `mlflow.register_model` keeps it (shown in the UI).
_MODEL_VERSIONS_TAG = "mlflow.modelVersions"


class RegistryError(RuntimeError):
    """Registering a student or moving an alias failed."""


@dataclass(frozen=True)
class GateDecision:
    """The outcome of the quality gate for one registered version."""

    name: str
    version: str
    alias: str
    promoted: bool
    reason: str
    accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    retention: float
    min_retention: float
    test_fingerprint: str

    @property
    def model_uri(self) -> str:
        """The registry URI of this version (`models:/NAME/VERSION`)."""
        return f"models:/{self.name}/{self.version}"


def texts_fingerprint(texts: list[str], gold_labels: list[Any]) -> str:
    """A content hash of labelled texts: equal only for the same texts and labels in the same order."""
    blob = json.dumps([list(texts), list(gold_labels)], default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pyfunc_accuracy(model_uri: str, texts: list[str], gold_labels: list[Any]) -> float:
    """Accuracy of a logged or registered student (any pyfunc URI) on labelled texts.

    The model is loaded with `mlflow.pyfunc.load_model` and fed a DataFrame with a `text` column; its `label` column
    (label values as in the train set) is compared with the gold labels.
    """
    if len(texts) != len(gold_labels):
        raise ValueError(f"{len(texts)} texts but {len(gold_labels)} gold labels")
    if not texts:
        raise ValueError("no texts to evaluate on")
    model = mlflow.pyfunc.load_model(model_uri)
    predicted = model.predict(pd.DataFrame({TEXT_COLUMN: pd.Series(list(texts), dtype=object)}))[LABEL_COLUMN]
    # tolist(): numpy scalars become Python values, so 1 == 1 and "pos" == "pos" compare as the gold labels do.
    hits = sum(p == g for p, g in zip(predicted.tolist(), gold_labels, strict=True))
    if hits == 0 and not set(predicted.tolist()) & set(gold_labels):
        logger.warning(
            "%s predicts none of the gold label values (%s ...)", model_uri, sorted(map(str, gold_labels))[:3]
        )
    return hits / len(texts)


def register_student(
    tracking_uri: str,
    model_uri: str,
    name: str,
    run_id: str,
    texts: list[str],
    gold_labels: list[Any],
    teacher_accuracy: float,
    min_retention: float,
    test_fingerprint: str | None = None,
    split_name: str = "test",
) -> GateDecision:
    """Register `model_uri` as a new version of `name` (linked to `run_id`) and apply the quality gate.

    The version becomes `champion` iff accuracy / `teacher_accuracy` >= `min_retention` and there is no champion or
    it beats the champion's accuracy on the same `texts` (a tie does not promote); otherwise it becomes `challenger`
    and `champion` stays where it was. `test_fingerprint` identifies the test set in the tags (default: a hash of the
    texts and labels); `split_name` is only used in the reason. Raises RegistryError if registering or an alias fails.
    """
    if teacher_accuracy <= 0:
        raise ValueError(f"teacher accuracy must be positive to compute the retention, got {teacher_accuracy}")
    if test_fingerprint is None:
        test_fingerprint = texts_fingerprint(texts, gold_labels)
    if mlflow.get_tracking_uri() != tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # pyfunc resolves models:/ URIs through the process-wide URI
    client = MlflowClient(tracking_uri)

    version = _create_version(client, model_uri, name, run_id)
    accuracy = pyfunc_accuracy(f"models:/{name}/{version}", texts, gold_labels)
    retention = accuracy / teacher_accuracy
    champion_version, champion_accuracy = _evaluate_champion(client, name, texts, gold_labels, test_fingerprint)

    failures = []
    if retention < min_retention:
        failures.append(f"retention {retention:.3f} is below the required {min_retention:.3f}")
    if champion_version is not None and champion_accuracy is None:
        failures.append(f"champion v{champion_version} could not be evaluated on {split_name} (see the log)")
    elif champion_accuracy is not None and not accuracy > champion_accuracy:
        failures.append(
            f"accuracy {accuracy:.3f} on {split_name} does not beat champion v{champion_version} "
            f"({champion_accuracy:.3f})"
        )
    promoted = not failures
    if not promoted:
        reason = "; ".join(failures)
    elif champion_version is None:
        reason = (
            f"no champion yet; accuracy {accuracy:.3f} on {split_name}, retention {retention:.3f} "
            f">= {min_retention:.3f}"
        )
    else:
        reason = (
            f"accuracy {accuracy:.3f} on {split_name} beats champion v{champion_version} ({champion_accuracy:.3f}); "
            f"retention {retention:.3f} >= {min_retention:.3f}"
        )
    alias = CHAMPION if promoted else CHALLENGER
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as e:
        raise RegistryError(f"could not set alias {alias!r} of registered model {name!r} to v{version}: {e}") from e

    decision = GateDecision(
        name=name,
        version=version,
        alias=alias,
        promoted=promoted,
        reason=reason,
        accuracy=accuracy,
        champion_version=champion_version,
        champion_accuracy=champion_accuracy,
        retention=retention,
        min_retention=min_retention,
        test_fingerprint=test_fingerprint,
    )
    _record(client, decision, run_id)
    logger.info("registered model %r v%s is the %s: %s", name, version, alias, reason)
    return decision


def _create_version(client: MlflowClient, model_uri: str, name: str, run_id: str) -> str:
    """Create `name` if missing, then a version from `model_uri`; return the version number."""
    try:
        client.create_registered_model(name)
        logger.info("created registered model %r", name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise RegistryError(f"could not create registered model {name!r}: {e}") from e
    # A MLflow 3 logged model (`models:/m-...`) is linked by id too, as `mlflow.register_model` does.
    model_id = model_uri.removeprefix("models:/").split("/", 1)[0] if model_uri.startswith("models:/m-") else None
    try:
        mv = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
    except MlflowException as e:
        raise RegistryError(f"could not register {model_uri} as a version of {name!r}: {e}") from e
    if mv.status != "READY":
        raise RegistryError(f"version {mv.version} of registered model {name!r} is {mv.status}, not READY")
    if model_id is not None:
        _link_logged_model(client, model_id, name, mv.version)
    logger.info("registered %s as version %s of %r", model_uri, mv.version, name)
    return str(mv.version)


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    # Best effort: only the UI reads this link, so a failure must not fail the registration.
    try:
        existing = client.get_logged_model(model_id).tags.get(_MODEL_VERSIONS_TAG)
        value = (json.loads(existing) if existing else []) + [{"name": name, "version": version}]
        client.set_logged_model_tags(model_id, {_MODEL_VERSIONS_TAG: json.dumps(value)})
    except (MlflowException, ValueError) as e:
        logger.warning("could not link logged model %s to %r v%s: %s", model_id, name, version, e)


def _evaluate_champion(
    client: MlflowClient, name: str, texts: list[str], gold_labels: list[Any], test_fingerprint: str
) -> tuple[str | None, float | None]:
    """The current champion's version and accuracy on `texts`; (None, None) without one, (version, None) if it fails.

    Called after the new version is created but before any alias moves, so the champion is never the new version.
    """
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as e:
        raise RegistryError(f"could not read the aliases of registered model {name!r}: {e}") from e
    if CHAMPION not in aliases:
        return None, None
    version = str(aliases[CHAMPION])
    stored = client.get_model_version(name, version).tags.get(f"{TAG_PREFIX}test_fingerprint")
    if stored is not None and stored != test_fingerprint:
        logger.info("champion v%s was gated on test set %s; re-evaluating it on %s", version, stored, test_fingerprint)
    try:
        return version, pyfunc_accuracy(f"models:/{name}@{CHAMPION}", texts, gold_labels)
    except Exception:  # noqa: BLE001 - any load or predict failure: keep the champion, say why, never promote blindly
        logger.exception("could not evaluate champion v%s of registered model %r", version, name)
        return version, None


def _record(client: MlflowClient, decision: GateDecision, run_id: str) -> None:
    """The decision as tags on the model version and on the run."""
    version_tags = {
        "accuracy": f"{decision.accuracy:.6f}",
        "retention": f"{decision.retention:.6f}",
        "test_fingerprint": decision.test_fingerprint,
        "decision": decision.alias,
        "reason": decision.reason,
    }
    if decision.champion_accuracy is not None:
        version_tags["champion_accuracy"] = f"{decision.champion_accuracy:.6f}"
    run_tags = {
        "decision": decision.alias,
        "reason": decision.reason,
        "version": decision.version,
        "name": decision.name,
    }
    try:
        for key, value in version_tags.items():
            client.set_model_version_tag(decision.name, decision.version, f"{TAG_PREFIX}{key}", value)
        for key, value in run_tags.items():
            client.set_tag(run_id, f"{RUN_TAG_PREFIX}{key}", value)
    except MlflowException as e:
        raise RegistryError(f"could not tag registered model {decision.name!r} v{decision.version}: {e}") from e
