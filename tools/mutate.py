"""Mutation testing: plant realistic bugs in zoo, one at a time, and check that the tests catch each one.

    python tools/mutate.py                      # every mutant, on the committed tree (git archive HEAD)
    python tools/mutate.py rope-linear-factor   # some of them, by name (or a prefix: `rotary-`)
    python tools/mutate.py --worktree           # on the tracked files as they are in the checkout now
    python tools/mutate.py --list               # names, files and tests
    python tools/mutate.py --check              # only: is every snippet still there, exactly once? (a second)

A mutant is one file, an exact snippet of it, its replacement, and the few tests that should fail
because of it (so that a run takes seconds, not the whole suite). Each is applied alone to a fresh
copy of the repository in a temporary directory (never to the checkout: others edit it), and the
tests run there with `python -m pytest -x`; the copy's `zoo` is the one imported (checked once).
Before the mutants, the union of their tests runs once on the unmutated copy: a test that fails
there would "kill" every mutant and mean nothing.

killed: the tests failed (or timed out). survived: they passed with the bug in place, so either a
test is missing or the mutated line does nothing (dead code); fix one or the other. A snippet that
is not found exactly once is an error, not a skip: the list must not rot as the code changes.

Exit status: 0 every mutant killed; 1 some survived; 2 a stale snippet, an unknown test or a
failing baseline. The kill rate goes in the README ("Testing") and stays at 100%.

"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent


class Mutant(NamedTuple):
    name: str
    file: str  # relative to the repository root
    old: str  # an exact snippet of the file, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root


def t(module: str, *tests: str) -> tuple[str, ...]:
    """Node ids of tests in tests/{module}.py (the whole file when none are named)."""
    path = f"tests/{module}.py"
    return tuple(f"{path}::{name}" for name in tests) or (path,)


PARITY = t("test_llama_parity", "test_logits_match_hf_fp32")
FAMILIES = t("test_families", "test_logits_match_hf_fp32")
TP = t("test_parallel", "test_world_2_equals_single_process_for_every_layout")

MUTANTS = [
    # ---- models/llama.py: names, q/k permutation, SwiGLU, residual, config ------------------------
    Mutant("llama-meta-w1-w3-swapped", "zoo/formats/meta.py",
           '"w1": "w_gate", "w3": "w_in"', '"w1": "w_in", "w3": "w_gate"',
           t("test_checkpoints", "test_meta_layout_equals_hf_layout")),
    Mutant("llama-hf-qk-permutation-inverted", "zoo/models/llama.py",
           "return t.reshape(heads, 2, cfg.head_dim // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)",
           "return t.reshape(heads, cfg.head_dim // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)", PARITY),
    Mutant("llama-swiglu-gate-on-up", "zoo/mlp.py",
           "self.activation(gate) * self.w_in(x)", "gate * self.activation(self.w_in(x))", PARITY),
    Mutant("llama-residual-skips-attention", "zoo/models/llama.py",
           'return hook(i, "resid_post", resid_mid + mlp_out)', 'return hook(i, "resid_post", resid_pre + mlp_out)',
           PARITY),
    Mutant("llama-hf-norm-eps-ignored", "zoo/models/llama.py",
           'norm_eps=key(cfg, "rms_norm_eps", POSITIVE, 1e-6)', "norm_eps=1e-6", PARITY),
    Mutant("llama-meta-hidden-dim-rounds-down", "zoo/models/llama.py",
           "self.multiple_of * math.ceil(hidden / self.multiple_of)", "self.multiple_of * (hidden // self.multiple_of)",
           t("test_inspect")),
    Mutant("save-llama-qk-left-in-metas-order", "zoo/models/llama.py",
           "    (name,), (t,) = hf_to_zoo(key), tensors\n    return zoo_tensor_to_hf(name, t, cfg)",
           "    (name,), (t,) = hf_to_zoo(key), tensors\n    return t",
           t("test_save", "test_saved_checkpoint_loads_in_transformers_with_the_same_logits")),
    # ---- models/opt.py ---------------------------------------------------------------------------------
    Mutant("opt-positions-without-offset", "zoo/models/opt.py",
           "h + self.pos_embed(step.positions + POSITION_OFFSET)", "h + self.pos_embed(step.positions)", FAMILIES),
    Mutant("opt-post-ln-norm-before-residual", "zoo/models/opt.py",
           "resid_pre + attn_out if pre else self.attn_norm(resid_pre + attn_out)",
           "resid_pre + attn_out if pre else self.attn_norm(resid_pre) + attn_out",
           FAMILIES),
    Mutant("opt-metaseq-qkv-order", "zoo/formats/metaseq.py",
           'QKV = ("k_proj", "v_proj", "q_proj")', 'QKV = ("q_proj", "k_proj", "v_proj")',
           t("test_original", "test_metaseq_checkpoint_matches_hf")),
    Mutant("save-opt-final-norm-flag-inverted", "zoo/models/opt.py",
           '"_remove_final_layer_norm": cfg.pre_norm and not cfg.final_norm',
           '"_remove_final_layer_norm": not cfg.pre_norm and not cfg.final_norm',
           t("test_save", "test_to_hf_config_inverts_from_hf_config")),
    # ---- models/gpt_neox.py ----------------------------------------------------------------------------
    Mutant("neox-qkv-split-as-blocks", "zoo/models/gpt_neox.py",
           "return t.reshape(heads, 3, cfg.head_dim, *t.shape[1:])[:, part].reshape(heads * cfg.head_dim, *t.shape[1:])",
           "return t.reshape(3, heads, cfg.head_dim, *t.shape[1:])[part].reshape(heads * cfg.head_dim, *t.shape[1:])",
           FAMILIES),
    Mutant("neox-parallel-mlp-reads-attention-output", "zoo/models/gpt_neox.py",
           'mlp_in = hook(i, "mlp_in", self.mlp_norm(resid_pre))',
           'mlp_in = hook(i, "mlp_in", self.mlp_norm(resid_pre + attn_out))',
           FAMILIES),
    Mutant("neox-full-rotary", "zoo/models/gpt_neox.py",
           "self.rotary_dim = int(self.head_dim * self.rotary_pct)", "self.rotary_dim = self.head_dim", FAMILIES),
    Mutant("neox-row-bias-always-summed", "zoo/formats/gpt_neox.py",
           '"sum" if parallel_residual else "one"', '"sum"', t("test_original", "test_neox_checkpoint_matches_hf")),
    Mutant("save-neox-qkv-fused-by-part-not-head", "zoo/models/gpt_neox.py",
           "for t in tensors], dim=1)  # (heads, 3, hd, ...)", "for t in tensors], dim=0)  # (heads, 3, hd, ...)",
           t("test_save", "test_saved_checkpoint_loads_in_transformers_with_the_same_logits")),
    # ---- forward.py, cache.py, kernels/attention.py: positions, masks, KV cache, scale ----------------
    # (rotary attention depends only on relative positions: OPT's learned positions are what see this one)
    Mutant("attention-left-pad-shifts-positions", "zoo/forward.py",
           "positions = (slots[None] - left_pad[:, None]).clamp(min=0)",
           "positions = slots[None].expand(len(left_pad), -1)", t("test_families", "test_left_padded_batch_matches_hf")),
    Mutant("attention-padding-attended", "zoo/forward.py",
           "not_pad = (keys >= left_pad[:, None, None]) | (keys == slots[:, None])",
           "not_pad = (keys >= 0) | (keys == slots[:, None])",
           t("test_llama_parity", "test_left_padded_batch_matches_hf_attention_mask")),
    Mutant("attention-cache-returns-only-new", "zoo/cache.py",
           "return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]",
           "return self.keys[layer][:, :, self.pos : end], self.values[layer][:, :, self.pos : end]",
           t("test_llama_parity", "test_kv_cache_matches_full_forward")),
    Mutant("attention-chunk-mask-hides-self", "zoo/forward.py",
           "causal = keys <= slots[:, None]  # (seq, keys)",
           "causal = keys < slots[:, None]  # (seq, keys)",
           t("test_llama_parity", "test_kv_cache_matches_full_forward")),
    Mutant("window-one-key-too-many", "zoo/forward.py",
           "causal = causal & (keys > slots[:, None] - window)", "causal = causal & (keys >= slots[:, None] - window)",
           t("test_families_window", "test_window_edges_match_hf")),
    Mutant("window-skipped-in-the-static-cache", "zoo/forward.py",
           "torch.arange(cache.max_len, device=device), cache.left_pad, window)",
           "torch.arange(cache.max_len, device=device), cache.left_pad)",
           t("test_families_window", "test_static_cache_and_compiled_decode_past_the_window")),
    Mutant("window-skipped-in-decode-steps", "zoo/forward.py",
           "(start == 0 or seq == 1) and (window is None or start + seq <= window)", "(start == 0 or seq == 1)",
           t("test_families_window", "test_window_edges_match_hf")),
    Mutant("qwen3-qk-norm-weights-not-permuted", "zoo/models/llama.py",
           r'r"attn\.(w[qk]|[qk]_norm)\.(weight|bias)$"', r'r"attn\.(w[qk])\.(weight|bias)$"', FAMILIES),
    Mutant("attention-unscaled-scores", "zoo/kernels/attention.py",
           "attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,",
           "attn_mask=mask, is_causal=mask is None and q.shape[2] > 1, scale=1.0,", PARITY),
    Mutant("attention-pattern-gqa-repeat-order", "zoo/kernels/attention.py",
           "k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)",
           "k, v = k.repeat(1, repeat, 1, 1), v.repeat(1, repeat, 1, 1)", t("test_hooks", "test_reading_hooks_change_nothing")),
    Mutant("attention-one-query-gqa-group-order", "zoo/kernels/attention.py",
           "q = q.float().view(batch, k.shape[1], group, head_dim)",
           "q = q.float().view(batch, group, k.shape[1], head_dim).transpose(1, 2)",
           t("test_llama_parity", "test_bf16_decode_attention_equals_sdpa_in_fp32")),
    # ---- rotary.py -------------------------------------------------------------------------------------
    Mutant("rotary-interleaved-sign", "zoo/rotary.py",
           "out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)",
           "out = torch.stack((x1 * cos + x2 * sin, x1 * sin - x2 * cos), dim=-1).flatten(-2)", PARITY),
    Mutant("rotary-half-split-as-interleaved", "zoo/rotary.py",
           "x1, x2 = xf[..., : rot // 2], xf[..., rot // 2 :]", "x1, x2 = xf[..., 0::2], xf[..., 1::2]", FAMILIES),
    Mutant("rotary-linear-scaling-multiplies", "zoo/rotary.py",
           'return freqs / scaling["factor"]', 'return freqs * scaling["factor"]', PARITY),
    Mutant("rotary-llama3-low-frequencies-unscaled", "zoo/rotary.py",
           "torch.where(wavelen > old_len / low, freqs / factor, blended)",
           "torch.where(wavelen > old_len / low, freqs, blended)", PARITY),
    Mutant("rotary-theta-exponent", "zoo/rotary.py",
           "[: rotary_dim // 2].float() / rotary_dim))", "[: rotary_dim // 2].float() / (rotary_dim // 2)))", PARITY),
    # ---- norm.py -----------------------------------------------------------------------------------------
    Mutant("rmsnorm-without-eps", "zoo/norm.py",
           "torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)", "torch.rsqrt(xf.pow(2).mean(-1, keepdim=True))",
           PARITY),
    Mutant("rmsnorm-weight-before-cast", "zoo/norm.py",
           "return self.normalized(x).type_as(x) * self.weight",
           "return (self.normalized(x) * self.weight.float()).type_as(x)",
           t("test_llama_parity", "test_rmsnorm_bf16_equals_hf_bit_for_bit")),
    # ---- parallel/ ------------------------------------------------------------------------------------------
    Mutant("parallel-row-bias-on-every-rank", "zoo/parallel/layers.py",
           "y = reduce_from_parallel(matmul(x))  # (..., out)\n    return y if bias is None else y + bias",
           "y = matmul(x)\n    return reduce_from_parallel(y if bias is None else y + bias)",
           t("test_parallel", "test_layers_match_fairscale_forward_and_backward")),
    Mutant("parallel-vocab-embedding-keeps-others-tokens", "zoo/parallel/layers.py",
           "outside = (local < 0) | (local >= self.weight.shape[0])", "outside = local < 0",
           t("test_parallel", "test_layers_match_fairscale_forward_and_backward")),
    Mutant("parallel-write-split-every-rank-the-first-slice", "zoo/parallel/layers.py",
           "    start = min(rank() * step, size)\n", "    start = 0\n",
           t("test_weights", "test_world_2[reads-and-writes-equal-one-process]")),
    Mutant("parallel-padding-read-from-the-start", "zoo/formats/lazy.py",
           "start = min(index * step, size)", "start = 0",
           t("test_parallel", "test_sizes_the_world_size_does_not_divide_are_padded")),
    Mutant("hooks-padded-neurons-counted-as-real", "zoo/hooks/points.py",
           "full = self.neurons if point in NEURON_POINTS else local * self.world", "full = local * self.world",
           t("test_hooks", "test_hooks_under_tensor_parallelism[padded]")),
    Mutant("parallel-copy-backward-not-reduced", "zoo/parallel/comm.py",
           "grad = grad.clone()\n        dist.all_reduce(grad)\n", "grad = grad.clone()\n",
           t("test_parallel", "test_layers_match_fairscale_forward_and_backward")),
    Mutant("parallel-kv-heads-not-checked", "zoo/attention.py",
           "if n_heads % world or n_kv_heads % world:", "if n_heads % world:",
           t("test_parallel", "test_world_size_that_does_not_divide_heads")),
    Mutant("save-tp-shards-gathered-with-padding", "zoo/save.py",
           "torch.cat(parts, dim).narrow(dim, 0, module.full_size)", "torch.cat(parts, dim)",
           t("test_save", "test_tensor_parallel_save_equals_one_process_byte_for_byte")),
    # ---- loader.py, original.py, checkpoint.py: merge and slice rules ------------------------------------
    Mutant("loader-meta-shards-merged-in-reverse", "zoo/formats/lazy.py",
           "            for p in self.parts:\n                lo, hi", "            for p in reversed(self.parts):\n                lo, hi",
           t("test_checkpoints", "test_meta_model_parallel_shards_merge")),
    Mutant("loader-every-rank-reads-slice-0", "zoo/formats/lazy.py",
           "start = shard.index * step if shard else 0", "start = 0", TP),
    Mutant("loader-meta-rope-freqs-not-ignored", "zoo/formats/meta.py",
           'META_IGNORED = re.compile(r"^rope\\.freqs$")', 'META_IGNORED = re.compile(r"^$")',
           t("test_checkpoints", "test_meta_layout_equals_hf_layout")),
    Mutant("original-norms-from-rank-0", "zoo/formats/lazy.py",
           't = (t / len(self.parts) if self.how == "mean" else t).to(dtype or self.dtype)',
           't = (self.parts[0].read(None, torch.float32) if self.how == "mean" else t).to(dtype or self.dtype)',
           t("test_original", "test_neox_checkpoint_matches_hf")),
    Mutant("checkpoint-mapped-pages-kept", "zoo/formats/files.py",
           "    if LIBC is None or t.numel() == 0:\n        return\n", "    return\n", t("test_memory")),
    # ---- sampling.py, generate.py, run.py -----------------------------------------------------------------
    Mutant("sampling-temperature-multiplies", "zoo/sampling.py",
           "logits = logits.float() / temperature", "logits = logits.float() * temperature",
           t("test_generate", "test_sample_frequencies_follow_softmax")),
    Mutant("sampling-top-k-drops-kth", "zoo/sampling.py",
           "logits.masked_fill(logits < kth,", "logits.masked_fill(logits <= kth,",
           t("test_generate", "test_sample_frequencies_follow_softmax")),
    Mutant("sampling-top-p-drops-crossing-token", "zoo/sampling.py",
           "drop = sorted_probs.cumsum(-1) - sorted_probs > top_p", "drop = sorted_probs.cumsum(-1) > top_p",
           t("test_generate", "test_sample_frequencies_follow_softmax")),
    Mutant("generate-right-padding", "zoo/generate.py",
           "tokens[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)",
           "tokens[row, :len(p)] = torch.tensor(p, dtype=torch.long)",
           t("test_llama_parity", "test_batch_of_different_lengths_equals_one_by_one")),
    Mutant("generate-rows-never-stop", "zoo/generate.py",
           "        done |= torch.isin(next_tokens, stop)\n", "",
           t("test_generate", "test_stops_at_stop_token_per_row")),
    Mutant("run-temperature-hard-coded", "run.py",
           "temperature=args.temperature,", "temperature=0.0,", t("test_run", "test_sampling_flags_and_seed_are_used")),
    Mutant("run-seed-ignored", "run.py", "seed=args.seed)", "seed=0)", t("test_run", "test_sampling_flags_and_seed_are_used")),
    Mutant("run-top-p-ignored", "run.py", "top_p=args.top_p,", "top_p=None,",
           t("test_run", "test_sampling_flags_and_seed_are_used")),
    Mutant("run-max-new-tokens-ignored", "run.py",
           "max_new_tokens=args.max_new_tokens,", "max_new_tokens=128,",
           t("test_run", "test_greedy_prints_the_models_continuation")),
    # ---- hooks.py (behaviour any rewrite keeps; extend the list as the module settles) ---------------------
    Mutant("hooks-mean-ablation-is-zero", "zoo/hooks/builtins.py",
           'new = torch.zeros_like(x[index]) if self.mode == "zero" else self._running_mean(x[index], ctx)',
           "new = torch.zeros_like(x[index])", t("test_hooks", "test_ablate_neurons_and_mean_mode")),
    Mutant("hooks-positions-are-slots", "zoo/hooks/points.py",
           "[None] - self.left_pad[:, None]", "[None].expand(len(self.left_pad), -1)",
           t("test_hooks", "test_builtins_in_a_padded_generation_equal_each_row_alone")),
    Mutant("hooks-final-points-cut-in-prefill", "zoo/hooks/points.py",
           'return self.wants(None, "ln_final") or self.wants(None, "logits")', "return False",
           t("test_hooks", "test_collect_over_generation_equals_full_forward")),
    Mutant("hooks-collect-keeps-old-runs", "zoo/hooks/builtins.py",
           "        if ctx.run != self.run:\n            self.store, self.where, self.run, self.storages = {}, {}, ctx.run, set()",
           "        if self.run is None:\n            self.store, self.where, self.run, self.storages = {}, {}, ctx.run, set()",
           t("test_hooks", "test_collect_holds_one_run_and_reads_like_a_dict")),
    Mutant("hooks-collect-no-copy-before-a-user-hook", "zoo/hooks/points.py",
           'if self.held and not getattr(fn, "keeps_input", False):', "if False:",
           t("test_hooks", "test_a_hook_that_edits_in_place_after_collect_changes_no_record")),
    Mutant("hooks-collect-shares-a-tensor-under-two-names", "zoo/hooks/builtins.py",
           "if self.copy or storage in self.storages:", "if self.copy:",
           t("test_hooks", "test_collect_keeps_references_each_its_own")),
    Mutant("hooks-patch-by-index-not-position", "zoo/hooks/builtins.py",
           "source = _lookup(self.cache.positions(ctx.name).to(x.device), pos)",
           "source = pos + (self.cache.left_pad.to(x.device)[:, None] if self.cache.left_pad is not None else 0)",
           t("test_hooks", "test_a_recording_begun_mid_run_patches_by_position")),
    Mutant("hooks-mean-ablation-misses-unhooked-positions", "zoo/hooks/builtins.py",
           "        if ctx.slot != slot:\n            self._missed(ctx, slot)\n", "",
           t("test_hooks", "test_mean_ablation_over_any_split_equals_one_forward")),
    Mutant("hooks-negative-heads-not-wrapped", "zoo/hooks/builtins.py", "        i %= full\n", "",
           t("test_hooks", "test_bad_indices_and_positions")),
    Mutant("hooks-result-dtype-not-cast", "zoo/hooks/points.py", "    return out.to(x.dtype)", "    return out",
           t("test_hooks", "test_returned_dtype_is_cast_back")),
    # ---- weights.py: the model map's layouts --------------------------------------------------------------
    Mutant("weights-W_O-heads-read-from-rows", "zoo/weights.py",
           "lambda w: w.view(w.shape[0], c.n_heads, -1).permute(1, 2, 0)", "lambda w: w.view(c.n_heads, -1, w.shape[0])",
           t("test_weights", "test_zeroing_a_heads_W_O_is_zero_ablating_it_on_z")),
    # ---- checks.py, compile.py ----------------------------------------------------------------------------
    Mutant("checks-left-pad-may-cover-the-row", "zoo/cache.py", "((left_pad >= 0) & (left_pad < seq))",
           "((left_pad >= 0) & (left_pad <= seq))", t("test_inputs", "test_bad_model_inputs")),
    Mutant("compile-static-cache-written-at-slot-0", "zoo/cache.py",
           "slots = self.slot + torch.arange(k.shape[2], device=k.device)",
           "slots = torch.arange(k.shape[2], device=k.device)",
           t("test_compile", "test_static_cache_equals_the_eager_cache_and_hf")),
    # ---- quant/ and kernels/ (behaviour any rewrite keeps; extend the list as the modules settle) -----------
    Mutant("quant-int8-odd-k-not-padded", "zoo/kernels/cpu.py", "CPU_INT8_K_MULTIPLE = 16", "CPU_INT8_K_MULTIPLE = 1",
           t("test_quant_widths")),
    Mutant("quant-output-may-be-the-source", "zoo/output.py", "        if out == src:", "        if False:",
           t("test_quant", "test_quantize_command_refuses_outputs_that_lose_data")),
    Mutant("quant-force-replaces-any-directory", "zoo/output.py", "    ours = written_by_zoo(out)\n",
           "    ours = set(held) if force else written_by_zoo(out)\n",
           t("test_quant", "test_force_never_removes_a_file_zoo_did_not_write")),
    Mutant("quant-model-forgets-its-source", "zoo/loader.py", "    model.source = directory.resolve()",
           "    model.source = None", t("test_quant", "test_save_refuses_the_directory_the_model_came_from")),
    Mutant("save-shards-past-the-limit", "zoo/save.py", "if groups[-1] and size + e.nbytes > limit:",
           "if groups[-1] and size > limit:", t("test_save", "test_sharded_with_hugging_faces_index")),
    Mutant("quant-int8-one-scale-per-tensor", "zoo/quant/int8.py",
           "scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127",
           "scales = w.abs().amax().clamp(min=1e-12).expand(w.shape[0]) / 127", t("test_quant")),
    Mutant("quant-int4-step-twice-too-coarse", "zoo/quant/int4.py",
           "scales = ((hi - lo) / 15).clamp(min=1e-12)", "scales = ((hi - lo) / 7.5).clamp(min=1e-12)", t("test_quant")),
    Mutant("quant-requantize-keeps-the-old-layout", "zoo/quant/linear.py",
           "self.quantized, self.prepared = dataclasses.replace(self.quantized, **fields), None",
           "self.quantized = dataclasses.replace(self.quantized, **fields)",
           t("test_weights", "test_a_quantized_in_place_edit_is_the_hook_ablation_it_stands_for")),
    Mutant("quant-int8-row-split-cuts-the-scales", "zoo/quant/int8.py", '"scales": (0, None)}', '"scales": (0, 0)}',
           t("test_quant", "test_quantized_under_tensor_parallelism")),
    Mutant("kernels-int4-nibbles-swapped", "zoo/kernels/reference.py",
           "return q[..., 0::2] | (q[..., 1::2] << 4)", "return q[..., 1::2] | (q[..., 0::2] << 4)", t("test_kernels")),
    Mutant("kernels-int8-dispatch-inverted", "zoo/kernels/__init__.py",
           "if rows > INT8_CPU_OP_MAX_M:", "if rows <= INT8_CPU_OP_MAX_M:",
           t("test_kernels")),
    Mutant("compile-cache-advanced-twice-past-recompile-limit", "zoo/forward.py",
           "if cache.steps == steps:", "if True:",
           t("test_compile", "test_past_dynamos_recompile_limit_the_eager_frames_are_right")),
    Mutant("kernels-native-one-row-path-skips-a-row", "zoo/kernels/native.cpp",
           "for (int64_t r = begin; r < end; ++r) tile(", "for (int64_t r = begin; r + 1 < end; ++r) tile(",
           t("test_native", "test_one_row_of_x_gives_the_rows_of_a_batch_bit_for_bit")),
    # ---- research instruments (#31): gradients, the quantized backward, sweeps, attribution -----------------
    Mutant("grads-every-point-a-new-leaf", "zoo/hooks/grads.py",
           "        if not x.requires_grad:\n            x = x.detach().requires_grad_()",
           "        x = x.detach().requires_grad_()",
           t("test_gradients", "test_gradients_equal_finite_differences")),
    Mutant("quant-backward-not-taken-in-one-process", "zoo/quant/linear.py",
           "if x.requires_grad and torch.is_grad_enabled():",
           "if False:",
           t("test_gradients", "test_quantized_gradients_flow_through_kernels_without_a_backward")),
    Mutant("sweep-prefix-keys-from-the-patched-layer", "zoo/analysis/sweep.py",
           "cache.keys[i][:, :, :start] = kv.keys[i][:, :, :start].repeat(n, 1, 1, 1)",
           "cache.keys[i][:, :, :start] = kv.keys[layer][:, :, :start].repeat(n, 1, 1, 1)",
           t("test_sweep", "test_layer_position_sweep_equals_patching_by_hand")),
    Mutant("attribution-gradient-of-the-clean-run", "zoo/analysis/attribution.py",
           "metric(model(corrupted, hooks=corrupted_acts)).backward()",
           "metric(model(clean, hooks=corrupted_acts)).backward()",
           t("test_attribution", "test_attribution_is_the_first_order_term_by_hand")),
]


def find(m: Mutant, root: Path) -> str:
    """The mutated text of m.file under root; an error when the snippet is not there exactly once."""
    text = (root / m.file).read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"error: mutant {m.name}: its snippet is found {count} times in {m.file} (wanted once); "
                         f"update it in tools/mutate.py:\n{m.old}")
    return text.replace(m.old, m.new)


def export(dest: Path, worktree: bool) -> None:
    """The repository's tracked files into dest: as committed (HEAD), or as they are in the checkout."""
    dest.mkdir(parents=True)
    if worktree:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            if (REPO / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, dest / name)
    else:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def copy_of(base: Path, dest: Path) -> Path:
    """A copy of base whose files are hard links (cheap); a file to change is unlinked first, never edited."""
    shutil.copytree(base, dest, copy_function=os.link)
    return dest


def first_failure(output: str) -> str:
    """The first test pytest's short summary names as failed or in error ('' if none)."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split()[1]
    return ""


def pytest(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | str, float, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, time.perf_counter() - start, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""


def check_imports_copy(root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", "import zoo; print(zoo.__file__)"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"error: the copy imports zoo from {out}, not from {root}: mutants would not be tested")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run, by name or name prefix (default: all)")
    p.add_argument("--worktree", action="store_true", help="copy the checkout's tracked files, not HEAD")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--check", action="store_true", help="only check that every snippet is found exactly once")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmutated copy")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutant's tests (default: %(default)s)")
    args = p.parse_args(argv)

    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("error: two mutants share a name")
    chosen = [m for m in MUTANTS if not args.names or any(m.name.startswith(n) for n in args.names)]
    if not chosen:
        raise SystemExit(f"error: no mutant named {', '.join(args.names)}; see --list")
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file:28s} {' '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="zoo-mutants-") as tmp:
        base = Path(tmp) / "base"
        export(base, args.worktree)
        for m in chosen:
            find(m, base)  # every snippet checked before anything runs
        if args.check:
            print(f"{len(chosen)} mutant snippet(s) found, each exactly once")
            return 0
        check_imports_copy(base)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(test for m in chosen for test in m.tests))
            rc, seconds, out = pytest(copy_of(base, Path(tmp) / "baseline"), tests, args.timeout * 3)
            if rc != 0:
                print(out[-4000:])
                raise SystemExit(f"error: the mutants' tests fail without any mutant (exit {rc}): fix that first")
            print(f"baseline: {len(tests)} test selection(s) pass unmutated ({seconds:.0f} s)", flush=True)

        survived, started = [], time.perf_counter()
        for m in chosen:
            root = copy_of(base, Path(tmp) / m.name)
            target = root / m.file
            text = find(m, root)
            target.unlink()  # a hard link to base: replace the file, do not write through it
            target.write_text(text)
            rc, seconds, out = pytest(root, m.tests, args.timeout)
            if rc in (4, 5):  # usage error (a test id not found) or nothing collected
                print(out[-2000:])
                raise SystemExit(f"error: mutant {m.name}: its tests {m.tests} were not found (pytest exit {rc})")
            verdict = "survived" if rc == 0 else "killed"
            if rc == 0:
                survived.append(m)
            by = "timeout" if rc == "timeout" else first_failure(out) if rc else ""
            print(f"{verdict:8s} {seconds:5.1f}s  {m.name}{f'  by {by}' if by else ''}", flush=True)
            shutil.rmtree(root)

    killed = len(chosen) - len(survived)
    print(f"\nkilled {killed} of {len(chosen)} mutants ({100 * killed / len(chosen):.1f}%) "
          f"in {time.perf_counter() - started:.0f} s")
    for m in survived:
        print(f"SURVIVED {m.name}: {m.file}: {m.old!r} -> {m.new!r}; tests {' '.join(m.tests)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
