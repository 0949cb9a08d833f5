"""Methods mixed into every vLLM worker (`worker_extension_cls`); the driver reaches them with `collective_rpc`."""

from __future__ import annotations

from typing import Any

from serve.engine.worker.runtime import SteeringRuntime


class SAEWorkerExtension:
    model_runner: Any  # set by the vLLM worker this class is mixed into

    def _sae_runtime(self) -> SteeringRuntime:
        runtime: SteeringRuntime = self.model_runner.get_model().sae_runtime
        if runtime.runner is None:
            runtime.runner = self.model_runner
        return runtime

    def sae_attach(self) -> dict:
        runtime = self._sae_runtime()
        return {"d_model": runtime.d_model, "n_layers": runtime.n_layers}

    def sae_load(self, sae_id: str, path: str) -> dict:
        return self._sae_runtime().load(sae_id, path)

    def sae_unload(self, sae_id: str) -> bool:
        return self._sae_runtime().unload(sae_id)

    def sae_finish(self, key: str) -> dict:
        """What a finished (or aborted) request left here: its captured rows and its steering report."""
        runtime = self._sae_runtime()
        return {"captures": runtime.captures.pop(key), "report": runtime.reports.pop(key)}
