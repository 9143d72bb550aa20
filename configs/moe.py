"""DeepSeekMoE-style GPTs on the builtin corpus, sized for a CPU, on the Llama-style backbone.

`--config configs/moe.py` (default): 8 routed experts (top-2) plus one always-on shared
expert in every layer, softmax gate and the balance loss; exports as Qwen2MoeForCausalLM.

`--config configs/moe.py:deepseek`: DeepSeek-V3 in miniature, every piece of its architecture
at CPU size (README "DeepSeek-V3 in miniature"):
- multi-head latent attention: keys and values from a 64-wide latent, the query from its own
  96-wide latent, per head 32 no-position + 16 rotary query/key widths and 32 value widths;
  the KV cache holds 80 numbers a token a layer (multi-head attention at this width: 256);
- DeepSeekMoE's fine-grained shape: 64 routed experts of width 64 (half of d_model), 6
  active, 2 shared, the first layer a dense MLP;
- DeepSeek-V3's router: sigmoid gate, the chosen gates renormalised and scaled by 2.5,
  group-limited routing (8 groups of 8 experts, a token's 6 chosen from its best 4 groups),
  and auxiliary-loss-free balancing: a per-expert routing bias moved by ±bias_rate after
  every step (0.01 here; DeepSeek-V3's 0.001 suits runs of many thousands of steps and
  needed ~200 of this preset's 300 to catch up with the router, see BENCHMARKS.md).
Per MoE layer a token uses 8 of 66 experts: 1.6M routed parameters, 0.2M active. Sparse
dispatch runs only the chosen experts, so a step costs about what tiny's dense step does
(bench/moe.py). Exports as transformers' DeepseekV3ForCausalLM (the bias is its
e_score_correction_bias); with `--config.model.attention_kind=mha` as Glm4MoeForCausalLM.
"""

from zhgpt_jax.config import load_preset


def get_config(variant='small'):
  c = load_preset('modern', 'tiny')
  c.model.mlp = 'moe'
  if variant == 'deepseek':
    c.model.attention_kind = 'mla'
    c.model.mla.update(q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32)
    c.model.moe.update(n_routed=64, n_shared=2, top_k=6, expert_hidden=64, first_dense=1,
                       gate='sigmoid', norm_topk=True, routed_scale=2.5, n_group=8,
                       topk_group=4, balance='bias', bias_rate=0.01, aux_weight=0.01,
                       z_weight=0.001, capacity_factor=2.0)
  else:
    c.model.moe.update(n_routed=8, n_shared=1, top_k=2, gate='softmax', every=1,
                       aux_weight=0.01, z_weight=0.001)
  return c
