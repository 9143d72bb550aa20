"""Small random HuggingFace checkpoints built by transformers itself, each with its own
tokenizer (trained with `tokenizers` on a slice of the corpus) saved beside it.

No project code builds them: they stand for the published checkpoints users start from.
"""

from __future__ import annotations

import os

import numpy as np

CHATML_TEMPLATE = (   # Qwen2's own (a default system turn), not ours
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_bpe(texts, vocab_size, specials):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _wordpiece(texts, vocab_size):
  """A BERT WordPiece tokenizer, as the popular Chinese GPT-2 checkpoints use."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import trainers
  tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  tok.train_from_iterator(texts, trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[(t, tok.token_to_id(t)) for t in ('[CLS]', '[SEP]')])
  return tok


def _randomize(model, seed):
  """Weights of std 0.3 (biases too): at transformers' 0.02 a wrong mapping hides in 1e-4."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and 'norm' in name or name.endswith(('ln_1.weight', 'ln_2.weight',
                                                          'ln_f.weight')):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
    for name, b in model.named_buffers():   # DeepSeek-V3's routing bias is a buffer
      if name.endswith('e_score_correction_bias'):
        b.copy_(0.1 * torch.randn_like(b))
  return model


def build(kind: str, directory: str, texts: list[str]) -> str:
  """Saves checkpoint `kind` (gpt2, gpt2_bert, llama, qwen2, qwen2_moe, deepseek_v3,
  deepseek_v3_q) to `directory`."""
  import transformers as T
  fast = T.PreTrainedTokenizerFast
  if kind == 'gpt2':          # tied, byte-level BPE with only <|endoftext|>
    tok = fast(tokenizer_object=_byte_bpe(texts, 500, ['<|endoftext|>']),
               bos_token='<|endoftext|>', eos_token='<|endoftext|>')
    config = T.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2,
                          n_head=4, bos_token_id=0, eos_token_id=0)
    model = T.GPT2LMHeadModel(config)
  elif kind == 'gpt2_bert':   # WordPiece; no eos named; vocab not a multiple of 128
    tok = T.BertTokenizerFast(tokenizer_object=_wordpiece(texts, 700))
    assert len(tok) % 128
    config = T.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                          n_inner=160, bos_token_id=None, eos_token_id=None)
    model = T.GPT2LMHeadModel(config)
  elif kind == 'llama':       # GQA, untied, <s> </s>
    tok = fast(tokenizer_object=_byte_bpe(texts, 500, ['<unk>', '<s>', '</s>']),
               bos_token='<s>', eos_token='</s>', unk_token='<unk>')
    config = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, rope_theta=500000.0,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = T.LlamaForCausalLM(config)
  elif kind in ('qwen2', 'qwen2_moe'):   # ChatML in the tokenizer; vocab padded past it
    tok = fast(tokenizer_object=_byte_bpe(
        texts, 500, ['<|endoftext|>', '<|im_start|>', '<|im_end|>']),
        eos_token='<|endoftext|>', pad_token='<|endoftext|>',
        additional_special_tokens=['<|im_start|>', '<|im_end|>'])
    tok.chat_template = CHATML_TEMPLATE
    common = dict(vocab_size=-(-len(tok) // 64) * 64 + 64, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, eos_token_id=0)
    if kind == 'qwen2':       # q/k/v biases, tied
      model = T.Qwen2ForCausalLM(T.Qwen2Config(tie_word_embeddings=True, **common))
    else:
      model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
          shared_expert_intermediate_size=64, norm_topk_prob=False, **common))
  elif kind in ('deepseek_v3', 'deepseek_v3_q'):   # MLA (with a query latent: _q), MoE
    bos, eos = '<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>'   # DeepSeek's own names
    tok = fast(tokenizer_object=_byte_bpe(texts, 500, [bos, eos]), bos_token=bos,
               eos_token=eos)
    # 3 layers, the first dense; 8 routed experts (top-2) + 1 shared; sigmoid router with
    # the correction bias, renormalised gates x 2.5; groups 1/1, or 2/1 to test grouping.
    model = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        n_group=2 if kind == 'deepseek_v3' else 1, topk_group=1,
        q_lora_rank=48 if kind == 'deepseek_v3_q' else None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1))
  else:
    raise ValueError(kind)
  _randomize(model, seed=len(kind)).save_pretrained(directory)
  tok.save_pretrained(directory)
  return directory


def corpus_texts(corpus_dir: str, n: int = 300) -> list[str]:
  with open(os.path.join(corpus_dir, 'news.txt'), encoding='utf-8') as f:
    return [line.strip() for line, _ in zip(f, range(n)) if line.strip()]


def hf_logits(directory: str, ids: np.ndarray) -> np.ndarray:
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()
