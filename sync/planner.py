"""The planner: one differ batch in, its plan out (convert → encode → classify).

The same object plans in the engine's pipeline thread and in every mapping worker process
(:mod:`sync.workers`), so the two ways of running a batch cannot drift apart: a worker
rebuilds it from :meth:`Planner.spec`, a small picklable description, and calls
:meth:`Planner.plan` exactly as the engine does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa

from sync.attributes import attribute_columns
from sync.config import Activation, AttributeType, SendPolicy
from sync.encode import encode_batch
from sync.mapping import ProfileMapper
from sync.model import Refusal
from sync.plan import BatchPlan, plan_rows


@dataclass(frozen=True)
class PlannerSpec:
    """What a worker process needs to build the same planner (plain data, picklable)."""

    activation_json: str
    types: dict[str, str]
    duplicates: dict[str, int]
    refused: dict[str, Refusal] | None


class Planner:
    """Maps and plans the differ's batches of one run.

    Args:
        activation: The activation (its mapping and Custom ID column).
        types: Column -> resolved attribute type (``resolve_attribute_types``).
        duplicates: Custom ID -> copies, for every duplicated id (from the id scan).
        refused: Payloads Batch did not apply before, by Custom ID (not sent again
            unchanged), or None to send them anyway (``--full``).
        mapper: The activation's mapper, when the caller built it already.
    """

    def __init__(
        self,
        activation: Activation,
        types: Mapping[str, AttributeType],
        *,
        duplicates: Mapping[str, int],
        refused: Mapping[str, Refusal] | None,
        mapper: ProfileMapper | None = None,
    ) -> None:
        self.activation = activation
        self.types = dict(types)
        self.mapper = mapper or ProfileMapper(activation, self.types)
        self.duplicates = duplicates
        self.refused = refused
        self.id_column = activation.mapping.custom_id
        # send: changed_attributes hashes each attribute (sync.attributes); nobody else pays for it.
        self.by_attribute = activation.send is SendPolicy.CHANGED_ATTRIBUTES

    def plan(self, batch: pa.RecordBatch, *, full: bool) -> tuple[BatchPlan, float]:
        """The batch's plan, and the seconds mapping and planning it took."""
        started = time.perf_counter()
        encoded = encode_batch(self.mapper.convert_batch(batch), keep_slots=self.by_attribute)
        planned = plan_rows(
            batch,
            encoded,
            full=full,
            duplicates=self.duplicates,
            id_column=self.id_column,
            refused=self.refused,
            attributes=attribute_columns(encoded) if self.by_attribute else None,
        )
        return planned, time.perf_counter() - started

    def spec(self) -> PlannerSpec:
        return PlannerSpec(
            self.activation.model_dump_json(),
            {column: kind.value for column, kind in self.types.items()},
            dict(self.duplicates),
            None if self.refused is None else dict(self.refused),
        )

    @classmethod
    def from_spec(cls, spec: PlannerSpec) -> Planner:
        activation = Activation.model_validate_json(spec.activation_json)
        types = {column: AttributeType(value) for column, value in spec.types.items()}
        return cls(activation, types, duplicates=spec.duplicates, refused=spec.refused)
