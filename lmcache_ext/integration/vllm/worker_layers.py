"""The worker's layerwise state (`use_layerwise`, `lmcache_ext/layerwise.py`), so that
copies overlap the forward layer by layer.

`load` starts the per-layer scatters of the step's host-hit loads (tier reads first),
`wait_layer` waits for one layer, `save_layer` gathers one layer of the step's stores
as the forward writes it, and `save` (wait_for_save) completes both: loads are
reported, with their errors, and stores take the usual way (a chunk is reported stored
only with every layer in its slot, so it becomes visible only once complete on every
rank). On a cross-layer cache (BL* layouts) a layer's copy writes its page of each
block of the chunk, so the chunk's bytes are those of a whole-step copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from lmcache_ext.executor import TransferExecutor
from lmcache_ext.integration.vllm.metadata import LoadItem, StepPlan, StoreItem
from lmcache_ext.integration.vllm.worker_jobs import BackgroundJobs
from lmcache_ext.layerwise import LayerwiseLoad, LayerwiseSave
from lmcache_ext.plans import SlotCopy


class StepLayers:
    """vLLM's layer names, the step's LayerwiseLoad and LayerwiseSave, and the thread
    that runs layerwise loads on CPU."""

    def __init__(self, jobs: BackgroundJobs) -> None:
        self._jobs = jobs
        self.enabled = False
        self._index: dict[str, int] = {}  # vLLM's layer name -> layer in a chunk
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="lmcache-layers")  # CPU layerwise loads
        self._load: tuple[list[LoadItem], LayerwiseLoad] | None = None  # this step's
        self._save: tuple[StepPlan, LayerwiseSave] | None = None  # this step's

    def bind(self, layer_names: Iterable[str], enabled: bool) -> None:
        """vLLM's layers, in the order of a chunk's layers."""
        self._index = {name: i for i, name in enumerate(layer_names)}
        self.enabled = enabled

    def start_loads(self, executor: TransferExecutor, items: list[LoadItem]) -> None:
        """Start the per-layer scatters of `items`, whose slots are filled."""
        load = LayerwiseLoad(
            executor,
            [i.copy for i in items],
            len(self._index),
            lambda fn, *args: self._copier.submit(fn, *args),
        )
        self._load = (items, load)

    def wait(self, layer_name: str) -> None:
        """Return once this step's loads have put `layer_name` in place."""
        layer = self._index.get(layer_name)
        if self._load is not None and layer is not None:
            self._load[1].wait(layer)

    def finish_loads(self) -> tuple[list[LoadItem], bool] | None:
        """Wait for every layer of the step's loads: its items and whether all copies
        succeeded (None: the step started none)."""
        if self._load is None:
            return None
        (items, load), self._load = self._load, None
        return items, load.finish()

    def save_layer(
        self, executor: TransferExecutor, plan: StepPlan, stores: Sequence[StoreItem], layer_name: str
    ) -> None:
        """The forward has written `layer_name`: gather its pages of `stores`, the plan's."""
        layer = self._index.get(layer_name)
        if layer is None:
            return
        if self._save is None or self._save[0] is not plan:
            self._save = (plan, self.new_save(executor, [i.copy for i in stores]))
        self._save[1].layer(layer)

    def take_save(self, plan: StepPlan) -> LayerwiseSave | None:
        """The per-layer gathers `save_layer` started for `plan`, if any; forgets them
        (and whatever an earlier step left)."""
        started, self._save = self._save, None
        return started[1] if started is not None and started[0] is plan else None

    def new_save(self, executor: TransferExecutor, items: Sequence[SlotCopy]) -> LayerwiseSave:
        """Per-layer gathers of `items`; on CPU each layer's runs on the saver thread."""
        return LayerwiseSave(executor, items, len(self._index), self._jobs.save)

    def close(self) -> None:
        self._copier.shutdown(wait=True)
