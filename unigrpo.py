"""
unigrpo: multimodal interleaved GRPO in one file, after Nie et al., "Towards Unified Multimodal Interleaved
Generation via Group Relative Policy Optimization" (NeurIPS 2025). docs/method.md states the method in full.

One transformer (Janus: a Llama trunk with an LM head for text tokens and a generation head for VQ image tokens)
writes text and images in ONE decoding trajectory. Stage 1 warms it up on a hybrid mix (interleaved +
understanding + text-to-image); stage 2 post-trains it with GRPO: G rollouts per prompt, hybrid reward
R = r_t + r_v + r_f, group-relative advantages (+ process advantages per segment), one clipped objective over the
text AND image tokens of each trajectory, k3 KL to the warm-up model.

What this simplifies:
1) Janus / Janus-Pro (transformers) stands in for the paper's VILA-U: the same one trunk, text head, image head.
2) The default is a toy world (3x3 scenes of shapes, a ~2.7M-parameter Janus, tokenizers and reward models
   trained here in minutes on a CPU) in which every prompt has a known true answer; --preset runs Janus-Pro.
3) An image is one fixed grid of VQ codes: the model opens it with <begin_of_image>, <end_of_image> is forced.
4) pi_old is the sampling policy's own teacher-forced forward, so the first ratio is exactly 1.
5) The process advantage is added to the outcome advantage (the paper leaves how they combine open).
6) r_v is a CLIP score by default (the paper's is ImageReward: --visual_scorer imagereward); the toy r_t is a parser.
7) No trainer framework: DDP by hand (as nanoGPT), FSDP2 by fully_shard, one process per GPU.

    python unigrpo.py --stage grpo                              # toy world on a laptop CPU, minutes
    python unigrpo.py --stage grpo --group_size=2 --kl_beta=0   # an ablation
    python unigrpo.py --stage grpo --preset janus-pro-7b --dry_run

Read top to bottom: config, model, plumbing (a first reading may skip it), the interleaved sampler, log-probs,
GRPO maths, warm-up, GRPO, command line, main.
"""
import contextlib, ctypes, datetime, difflib, gc, importlib.util, json, math, os, random, shutil, sys, tempfile, time
from ast import literal_eval
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from tqdm import tqdm

import data
import rewards


# -----------------------------------------------------------------------------
# Config: the defaults (override from the command line: --key value or --key=value)
# I/O
stage = "grpo"            # prepare | warmup | grpo; missing earlier stages run first (evaluate: python eval.py)
out_dir = "out"           # checkpoints, metrics.jsonl, storyboards
seed = 1337
device = "auto"           # auto = cuda if present, else cpu
dry_run = False           # print the resolved config (and a memory estimate) and exit
preset = ""               # "" = toy world; janus-pro-1b / janus-pro-7b = paper-scale settings
log_interval = 1          # iterations between log lines / metrics.jsonl rows
ckpt_interval = 100       # iterations between atomic checkpoints (and always at the end)
storyboard_interval = 20  # GRPO iterations between storyboards (and always at the end)
wandb_log = False         # mirror metrics.jsonl to Weights & Biases (WANDB_MODE=offline works); needs wandb
wandb_project = "unigrpo"
wandb_run_name = ""       # "" = wandb's own name
tensorboard = False       # mirror metrics.jsonl as TensorBoard scalars in out_dir/tensorboard; needs tensorboard
# model
model = ""                # "" = tiny Janus for the toy world; else an HF id or a local folder
n_layer = 4               # tiny Janus trunk (toy world only)
n_embd = 128
n_head = 4
image_size = data.IMAGE_SIZE  # toy images: 24x24, a 3x3 scene grid
patch_size = data.PATCH_SIZE  # VQ downsampling: 24/8 = 3x3 = 9 image tokens per image, one per scene cell
codebook_size = 16        # a cell holds one of 13 things; the toy VQ gives each its own code (data.train_vq)
lora_rank = 0             # > 0: train LoRA adapters (peft) on the trunk, base frozen (the paper's QLoRA row)
lora_alpha = 16           # LoRA scale = lora_alpha / lora_rank
qlora = False             # with --lora_rank on a CUDA GPU: the frozen trunk in 4-bit NF4 (needs bitsandbytes)
# prepare (toy world tokenizers and reward models)
vq_steps = 400
clip_steps = 300          # top-1 retrieval 1.0 from 300 on (README)
# warm-up (stage 1)
warmup_iters = 1000
warmup_batch_size = 24    # as good as 32 at 3/4 of the time (README)
warmup_lr = 5e-4          # much higher and it learns which objects a sentence names, never where they go
warmup_rise = 50          # warm-up schedule: linear rise over this many iterations, then cosine decay to 0
n_understanding = 2000    # mix size; interleaved : understanding : t2i = interleaved_ratio : 1 : 1
interleaved_ratio = 0.6   # twice the paper's 0.3M : 1M : 1M: more GRPO groups hold a right step (README)
warmup_stall = 0.3        # toy world: share of interleaved warm-up steps that repeat the state before (README)
cfg_dropout = 0.0         # warm-up: prob. of training an example as CFG's unconditional branch (Janus: 0.1)
warmup_data = ""          # a JSONL file of real warm-up data (see data.py); "" = toy world mix
rl_data = ""              # a JSONL file of GRPO prompts (see data.py); "" = toy world prompts
eval_data = ""            # a JSONL file of evaluation prompts, same format; "" = toy world held-out prompts
# sampling
temperature = 1.0
cfg_scale = 1.0           # classifier-free guidance for image tokens (1 = off); the paper samples with 3
max_new_tokens = 200      # per trajectory (text + image + forced end-of-image tokens)
max_text_tokens = 32      # per text segment; a longer segment stops the row (runaway text)
max_images = 4            # a row that opens one image more stops (runaway images)
# GRPO (stage 2)
grpo_iters = 30           # pays for the 0.6 mix's longer warm-up; 36 gains +0.011 but forgets on 2 of 10 seeds (README)
prompts_per_step = 64     # prompts per iteration (x G rollouts): smaller batches gave gradients mostly noise (README)
rl_tasks = "story,howto,continuation,understanding"  # GRPO's prompt families (RL split); understanding's
                          # share keeps GRPO from unlearning it (README)
group_size = 4            # G, rollouts per prompt (paper: 4)
lr = 5e-5                 # AdamW
inner_epochs = 2          # optimisation passes over each batch of rollouts
micro_batch = 32          # rollouts per forward/backward of the update, by length; gradients accumulate (memory)
clip_eps = 0.2
kl_beta = 0.1             # k3 KL weight (the paper: 0.04, the presets' value); 0.1 keeps the toy world's understanding
                          # (README, "Warm-up vs GRPO"); 0 = no KL term and no reference model in memory
loss_type = "sequence"    # sequence: the paper's 1/|o_i| mean per trajectory; token: mean over all tokens
grad_clip = 1.0
use_format_reward = True  # r_f, structural fidelity
use_text_reward = True    # r_t, textual relevance (toy critic / VLM critic)
use_visual_reward = True  # r_v, visual-text alignment (CLIP score)
process_reward = True     # add per-segment process advantages to the outcome advantage
scale_rewards = "group"   # advantages divided by each group's reward std (the paper) | batch: one std for the batch
visual_scorer = "clip"    # clip (tiny CLIP trained here) | clip_weak (1/10 the training) | openclip:NAME | imagereward
text_critic = "toy"       # toy | a HF id / folder of a VLM critic (full scale)
# eval
eval_prompts = 256        # eval.py: held-out prompts per evaluation (fewer: seed-to-seed noise hides the changes)
eval_interval = 6         # GRPO iterations between held-out evaluations (eval/* rows in metrics.jsonl); 0 = off
run_eval_prompts = 96     # held-out prompts per such evaluation and for the before/after table at the end of GRPO
# system
dtype = "float32"         # float32 | bfloat16: bf16 autocast (GPU); trained weights and AdamW stay float32
grad_checkpointing = False  # recompute decoder layers in backward: less activation memory (GPU, long rollouts)
fsdp = False              # under torchrun: shard weights, gradients and AdamW over the ranks (FSDP2), full fine-tunes
cpu_threads = 0           # torch threads on CPU; 0 = torch's default, one per core (README, "Speed")
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
DEFAULTS = {k: globals()[k] for k in config_keys}
# The paper's recipe, one flag away (see README, "Full scale"). Where each number comes from:
#   GRPO: G = 4, lr 1e-6, k3 KL beta 0.04, CFG 3 when sampling images (the paper); one inner epoch (TRL's default).
#   warm-up (our choice, not the paper's): lr 1e-5, the usual fine-tuning range for a pretrained model, 100-iteration
#   rise then cosine, batch 128, 2000 iterations; CFG prompt dropout 0.1 (Janus's way of training CFG, our rate).
#   critic: Qwen2.5-VL-7B-Instruct for r_t (our choice; the paper used LLaVA-Critic); r_v: open_clip ViT-L/14
#   (the paper's CLIP-score ablation; ImageReward is --visual_scorer imagereward).
_FULL = dict(image_size=384, patch_size=16, group_size=4, lr=1e-6, kl_beta=0.04, inner_epochs=1, dtype="bfloat16",
             visual_scorer="openclip:ViT-L-14/openai", text_critic="Qwen/Qwen2.5-VL-7B-Instruct", max_new_tokens=2600,
             max_text_tokens=256, cfg_scale=3.0, grad_checkpointing=True, warmup_lr=1e-5, warmup_rise=100,
             warmup_iters=2000, warmup_batch_size=128, cfg_dropout=0.1, grpo_iters=500, ckpt_interval=50,
             eval_prompts=1000)
PRESETS = {"janus-pro-1b": dict(_FULL, model="deepseek-community/Janus-Pro-1B", prompts_per_step=8),
           "janus-pro-7b": dict(_FULL, model="deepseek-community/Janus-Pro-7B", prompts_per_step=4)}
PRESET_DATA = {"warmup": "warmup_data", "grpo": "rl_data", "eval": "eval_data"}  # what a preset run needs per stage


# -----------------------------------------------------------------------------
# The model: one trunk, two heads, two input embeddings


class UnifiedModel(torch.nn.Module):
    """The parts of JanusForConditionalGeneration the method needs, under names that read like it: text tokens in
    by the token embedding, out by the LM head; image tokens (VQ codes) in by the generation embedding + aligner,
    out by the generation head; context images by the understanding path (SigLIP + aligner) at
    <image_placeholder> slots. One trunk serves both, so one trajectory holds both modalities."""

    def __init__(self, janus, tokenizer, chat=False):
        super().__init__()
        self.janus, self.tokenizer, self.chat = janus, tokenizer, chat
        ids = lambda t: tokenizer.convert_tokens_to_ids(t)
        self.boi_id, self.eoi_id = ids("<begin_of_image>"), ids("<end_of_image>")
        self.image_id = janus.config.image_token_id
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.sep_id = None if chat else tokenizer.sep_token_id
        self.n_image_tokens = janus.config.vq_config.num_patches ** 2  # tokens per generated image
        self.n_context_tokens = janus.config.vision_config.num_image_tokens  # placeholders per context image
        self.image_size = janus.config.vision_config.image_size
        janus.model.vqmodel.requires_grad_(False)  # the image tokenizer stays frozen, as in Janus

    @property
    def device(self):
        return self.janus.lm_head.weight.device

    def forward(self, fn, *args, **kwargs):
        """Every computation on the weights enters here (the sampler, teacher-forced log-probs), so FSDP's hooks
        gather the root's weights around it; without FSDP it is a plain call."""
        return fn(self, *args, **kwargs)

    def encode_prompt(self, segments):
        """Prompt segments -> (token ids, [pixel tensors]). Context images use the understanding path."""
        ids, pixels = [self.bos_id], []
        if self.chat:  # Janus-Pro's conversation format
            ids += self.tokenizer("<|User|>: ", add_special_tokens=False).input_ids
        for kind, x in segments:
            if kind == "text":
                ids += self.tokenizer(x, add_special_tokens=False).input_ids
            else:
                ids += [self.boi_id] + [self.image_id] * self.n_context_tokens + [self.eoi_id]
                pixels.append(self.pixels(x))
        ids += self.tokenizer("\n\n<|Assistant|>:", add_special_tokens=False).input_ids if self.chat else [self.sep_id]
        return ids, pixels

    def encode_answers(self, answers, batch=256):
        """Target segment lists -> per answer (ids, is_image, trainable), images as VQ codes (encoded `batch` at a
        time); <end_of_image> is forced by the sampler after a full grid, so it is not a trained prediction."""
        key = lambda im: (im.mode, im.size, im.tobytes())  # a scene recurs across a mix: each is encoded once
        unique = list({key(x): x for segments in answers for k, x in segments if k == "image"}.values())
        codes = [c.tolist() for i in range(0, len(unique), batch) for c in self.vq_encode(unique[i:i + batch])]
        codes = dict(zip(map(key, unique), codes))
        out = []
        for segments in answers:
            ids, is_image, train = [], [], []
            for kind, x in segments:
                if kind == "text":
                    t = self.tokenizer(x, add_special_tokens=False).input_ids
                    ids, is_image, train = ids + t, is_image + [False] * len(t), train + [True] * len(t)
                else:
                    c = codes[key(x)]
                    ids += [self.boi_id] + c + [self.eoi_id]
                    is_image += [False] + [True] * len(c) + [False]
                    train += [True] * (len(c) + 1) + [False]
            out.append((ids + [self.eos_id], is_image + [False], train + [True]))
        return out

    def pixels(self, img):
        img = img.convert("RGB")
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size))
        return data.to_tensor(img)

    @torch.no_grad()
    def vq_encode(self, images):
        x = torch.stack([self.pixels(im) for im in images]).to(self.device)
        return self.janus.model.vqmodel.encode(x).image_tokens.view(len(images), -1)

    def vq_decode(self, codes):
        return data.vq_decode(self.janus.model.vqmodel, codes)

    def embed(self, ids, is_image):
        """Per-token input embedding: text table for text tokens, generation embedding for image codes."""
        text = self.janus.get_input_embeddings()(torch.where(is_image, self.pad_id, ids))
        if not is_image.any():
            return text
        image = self.janus.prepare_embeddings_for_image_generation(torch.where(is_image, ids, 0))
        return torch.where(is_image.unsqueeze(-1), image.to(text.dtype), text)

    def trunk(self, embeds, attention_mask, position_ids, cache=None, context_pixels=None, placeholders=None):
        """Run the shared transformer. Context images are scattered into the <image_placeholder> slots
        (`placeholders`: a bool mask; a VQ code may share the placeholder's id, so ids alone won't do)."""
        if context_pixels is not None and len(context_pixels):
            feats = self.janus.model.get_image_features(context_pixels.to(embeds.dtype)).pooler_output
            feats = feats.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(placeholders.unsqueeze(-1), feats)
        lm = self.janus.model.language_model
        return lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                  use_cache=cache is not None).last_hidden_state

    def text_logits(self, h):
        return self.janus.lm_head(h)

    def image_logits(self, h):
        return self.janus.model.generation_head(h)


def tiny_janus(tokenizer, vq, cfg):
    """A ~2.7M-parameter Janus for the toy world: a Llama trunk of n_layer x n_embd, a 2-layer SigLIP for context
    images, and the VQ trained in `prepare` (its grid must match the model's, checked below)."""
    from transformers import JanusConfig, JanusForConditionalGeneration
    H = cfg.n_embd
    config = JanusConfig(
        text_config=dict(model_type="llama", hidden_size=H, intermediate_size=4 * H, num_hidden_layers=cfg.n_layer,
                         num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, vocab_size=len(tokenizer),
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        # JanusConfig sets the VQ's grid to the understanding path's (vision image_size // patch_size), so
        # the two share patch_size: a context image is read as the same 3x3 grid that is generated
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0,
                           image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=H, depth=2,
                           num_image_tokens=(cfg.image_size // cfg.patch_size) ** 2),
        vq_config=vq.config.to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
    if config.vq_config.num_patches != vq.config.num_patches:
        raise ValueError(f"the VQ makes a {vq.config.num_patches}x{vq.config.num_patches} grid but the model would "
                         f"sample {config.vq_config.num_patches}x{config.vq_config.num_patches}: build the VQ with "
                         f"--image_size {cfg.image_size} --patch_size {cfg.patch_size}")
    janus = JanusForConditionalGeneration(config)
    # the image paths (SigLIP + aligner in, generation embedding + aligner in, generation head out) at PyTorch's
    # init: at HF's N(0, 0.02) images were learnt late or never (README, "The warm-up's init")
    m = janus.model
    data.fan_in_init(m.vision_model, m.aligner)
    m.generation_embeddings.reset_parameters()
    data.fan_in_init(m.generation_aligner, m.generation_head)
    m.vqmodel.load_state_dict(vq.state_dict())  # the VQ trained in `prepare`
    return janus


def looks_local(path):
    """A folder path rather than a hub id ("org/name"): it must then exist."""
    return path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1


def checkpoint_path(path):
    """A hub id as it is, or a local folder, which must hold a checkpoint."""
    path = os.path.expanduser(path)
    if looks_local(path) and not is_checkpoint(path):
        fail(f"no Janus checkpoint at {path!r} (a folder with config.json from save_pretrained); "
             "run the earlier stage, or pass --model an HF id such as deepseek-community/Janus-Pro-1B")
    return path


def lora_base(path):
    """The base a LoRA checkpoint's adapters sit on: save_checkpoint writes a local base relative to `path`."""
    from peft import PeftConfig
    base = PeftConfig.from_pretrained(path).base_model_name_or_path
    local = os.path.normpath(os.path.join(path, base))
    return local if base.startswith((".", "/")) or os.path.exists(local) else base


def four_bit_kwargs(device, dtype):
    """QLoRA's from_pretrained arguments: the trunk in 4-bit NF4; heads, embeddings, vision and VQ stay in dtype."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("4-bit loading (QLoRA) needs bitsandbytes: pip install bitsandbytes (and a CUDA GPU)")
    from transformers import BitsAndBytesConfig
    return dict(device_map={"": device}, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=[
            "vision_model", "aligner", "generation_embeddings", "generation_head", "lm_head", "vqmodel"]))


def add_lora(model, rank, alpha, base):
    """Fresh adapters (model.lora) on the trunk's attention and MLP projections; dropout 0, so sampling and the
    update see one policy. `base`: the folder or id their adapter_config.json names."""
    from peft import LoraConfig, get_peft_model
    target = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target)
    model.lora = get_peft_model(model.janus, config)
    model.lora.peft_config["default"].base_model_name_or_path = base
    return model


def load_model(path, device, dtype=torch.float32, lora_rank=None, lora_alpha=16, four_bit=False):
    """Any Janus folder saved by save_pretrained (ours or a hub id) with its tokenizer, or a LoRA checkpoint of
    ours (adapter_config.json: adapters over the base it names). lora_rank=None keeps a checkpoint's adapters
    attached and trainable (resume, eval); an int merges them into the weights (one set of adapters trains at a
    time) and, if > 0, attaches fresh adapters of that rank. four_bit: the base in 4 bits (QLoRA, --qlora)."""
    from transformers import AutoTokenizer, JanusForConditionalGeneration
    path = checkpoint_path(path)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel
        base = lora_base(path)
        model = load_model(base, device, dtype, 0, four_bit=four_bit)
        model.lora = PeftModel.from_pretrained(model.janus, path, is_trainable=True)
        model.lora.peft_config["default"].base_model_name_or_path = base  # resolved; save_checkpoint relativises it
        if lora_rank is not None:  # merge: the adapters become weights
            merged = model.lora.merge_and_unload().requires_grad_(not four_bit)
            model = UnifiedModel(merged, model.tokenizer, model.chat)
    else:
        kwargs = four_bit_kwargs(device, dtype) if four_bit else {}
        janus = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = UnifiedModel(janus if four_bit else janus.to(device), tokenizer, chat=tokenizer.sep_token_id is None)
    return add_lora(model, lora_rank, lora_alpha, path) if lora_rank else model  # path: merged adapters included


# the toy world's tokenizers and reward models (stage `prepare`), cached in out_dir/prepare


def prepared_parts(cfg):
    """What `prepare` makes: the weak CLIP only for the run that scores with it (the ablation's row)."""
    return ("tokenizer", "vq", "clip") + (("clip_weak",) if cfg.visual_scorer == "clip_weak" else ())


def prepare(cfg):
    """Toy world: text tokenizer, VQ image tokenizer and the tiny CLIP for r_v, cached in out_dir/prepare."""
    root = os.path.join(cfg.out_dir, "prepare")
    for name in prepared_parts(cfg):
        recover(os.path.join(root, name))  # a part whose save was killed between its renames is not redone
    if not os.path.exists(os.path.join(root, "tokenizer")):
        atomic_dir(os.path.join(root, "tokenizer"), data.build_text_tokenizer().save_pretrained)
    tok = _load_tokenizer(root)
    if not os.path.exists(os.path.join(root, "vq")):
        vq_config = data.make_vq_config(cfg.image_size, cfg.patch_size, cfg.codebook_size, cfg.n_embd)
        images = data.vq_training_images(1500, seed=cfg.seed, image_size=cfg.image_size)
        vq, stats = data.train_vq(vq_config, images, steps=cfg.vq_steps, seed=cfg.seed,
                                  labels=data.latent_labels(images, vq_config.num_patches))
        print(f"prepare: VQ tokenizer {json.dumps(stats)}")
        atomic_dir(os.path.join(root, "vq"), vq.save_pretrained)
    for i, (name, steps) in enumerate((("clip", cfg.clip_steps), ("clip_weak", max(1, cfg.clip_steps // 10)))):
        if name in prepared_parts(cfg) and not os.path.exists(os.path.join(root, name)):
            rs = random.Random(cfg.seed + i)  # each scorer's own scenes, whichever is made first
            scenes = [data.random_scene(rs) for _ in range(4000)]
            scorer, stats = rewards.train_tiny_clip([data.render(s, cfg.image_size) for s in scenes],
                                                    [data.describe(s) for s in scenes], tok, cfg.image_size,
                                                    steps=steps, seed=cfg.seed, patch_size=cfg.patch_size)
            print(f"prepare: tiny CLIP ({name}) {json.dumps(stats)}")
            atomic_dir(os.path.join(root, name), lambda d: rewards.save_clip(scorer, d))


def _load_tokenizer(root):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(os.path.join(root, "tokenizer"))


def load_prepared(cfg):
    from transformers import JanusVQVAE
    root = os.path.join(cfg.out_dir, "prepare")
    return _load_tokenizer(root), JanusVQVAE.from_pretrained(os.path.join(root, "vq")), root


# =============================================================================
# PLUMBING: devices, DDP and FSDP2, checkpoints and resume, logging, the --dry_run memory estimate.
# None of it is the method: a first reading may skip to "END OF PLUMBING".
# =============================================================================


def resolve_device(cfg):
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def autocast(cfg, dev):
    """bf16 compute (matmuls, attention) over float32 weights: AdamW's small steps survive in float32."""
    return torch.autocast(torch.device(dev).type, torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def for_training(model, cfg):
    if cfg.grad_checkpointing:  # non-reentrant: works when the inputs need no grad (frozen embeddings, LoRA)
        model.janus.activation_checkpointing_enable({"use_reentrant": False})
    return model


def progress(desc, start, total):
    """range(start, total) with a progress bar on the master."""
    return tqdm(range(start, total), desc=desc, initial=start, total=total, disable=None if rank() == 0 else True)


# DDP, as nanoGPT wires it: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE, one process per GPU (or CPU slot); every
# rank samples and trains on its share of the global batch, the master writes the files


def ddp_init(cfg):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); False when not launched by torchrun."""
    if "RANK" not in os.environ:
        return False
    cuda = resolve_device(cfg).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" then means this rank's GPU
    # a long timeout: the others wait while the master alone runs `prepare` or samples a storyboard
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")  # one voice: the master prints; errors still reach stderr
    return True


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier():
    if world_size() > 1:
        torch.distributed.barrier()


def all_sum(x):
    """x summed over ranks (x itself in one process); nccl reduces CUDA tensors, gloo CPU ones."""
    if world_size() == 1:
        return x
    y = x.detach().to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu", copy=True)
    torch.distributed.all_reduce(y)
    return y.to(x.device)


def mean_over_ranks(metrics, weights):
    """Average a dict of floats over ranks; a key in `weights` is weighted by that rank's count (tokens)."""
    if world_size() == 1:
        return metrics
    w = torch.tensor([float(weights.get(k, 1)) for k in metrics], dtype=torch.float64)
    s = all_sum(torch.stack([torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64) * w, w]))
    return dict(zip(metrics, (s[0] / s[1].clamp(min=1e-30)).tolist()))


def broadcast_from_master(model):
    """Every rank starts from the master's weights (what DDP's constructor does)."""
    if world_size() == 1:
        return
    for t in model.state_dict().values():
        torch.distributed.broadcast(t, 0)


def average_gradients(params):
    """What DDP's wrapper does after backward, by hand: our loss does not come from module.forward, and ranks
    touch different parameters (no image token, no generation-head gradient). README, "Full scale"."""
    if world_size() == 1:
        return
    has = all_sum(torch.tensor([float(p.grad is not None) for p in params]))
    live = [p for p, h in zip(params, has.tolist()) if h > 0]  # no gradient on any rank: stays None, as in one process
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for work in [torch.distributed.all_reduce(p.grad, async_op=True) for p in live]:
        work.wait()
    for p in live:
        p.grad /= world_size()


def apply_gradients(opt, grad_clip, model=None):
    """After backward (one or several, accumulated): gradients averaged over ranks, clipped, one AdamW step;
    returns the norm before clipping."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if is_sharded(params):  # FSDP has reduce-scattered the mean gradient; only None must be restored
        drop_unused_grads(model)
    else:
        average_gradients(params)
    gn = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return gn.full_tensor() if hasattr(gn, "full_tensor") else gn


# FSDP2 (--fsdp): fully_shard over each decoder layer of the trunk, then the root; full fine-tunes only


def shard(model, reshard_root=False):
    """Shard weights (then gradients and AdamW states) over the ranks: each decoder layer is a unit (gathered for
    its forward and backward), the root holds the rest (embeddings, heads, vision; gathered around
    model.forward). The frozen VQ stays whole on every rank: encode_answers and decode_rollout use it outside."""
    from torch.distributed.fsdp import fully_shard
    for layer in model.janus.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model, ignored_params=set(model.janus.model.vqmodel.parameters()),
                reshard_after_forward=True if reshard_root else None)  # the reference has no backward to reshard it
    model.set_reduce_scatter_unused_params(True)  # ranks leave different heads unused: every rank reduces every one
    return model


def is_sharded(params):
    return any(type(p).__name__ == "DTensor" for p in params)


# the parts a batch may leave unused (no context image, no image token), by janus parameter name
OPTIONAL_PATHS = {"vision": ("model.vision_model.", "model.aligner."),
                  "image_in": ("model.generation_embeddings.", "model.generation_aligner."),
                  "image_out": ("model.generation_head.",)}


def drop_unused_grads(model):
    """FSDP gave a zero gradient to what no rank used (_sequence_logprobs records what each rank's forwards used);
    one process leaves it None, and AdamW skips it (no step, no moment decay)."""
    used = all_sum(torch.tensor([float(k in model.grad_paths) for k in OPTIONAL_PATHS]))
    model.grad_paths = set()
    for (k, prefixes), u in zip(OPTIONAL_PATHS.items(), used.tolist()):
        for name, p in model.janus.named_parameters():
            if u == 0 and name.startswith(prefixes):
                p.grad = None


@contextlib.contextmanager
def gathered(model):
    """Sampling under FSDP: each unit's weights are gathered for the first decoded token and kept until the end,
    so ranks whose rollouts end at different lengths run no collective in the loop. Plain models: nothing."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in [m for m in model.modules() if isinstance(m, FSDPModule)]:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # the root's default: kept for backward


def full_state_dict(model):
    """Under FSDP: the full weights (janus' keys) on the master, {} elsewhere (a collective); else None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not is_sharded(model.parameters()):
        return None
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = lambda dup: {n for n, _ in model.janus.named_parameters(remove_duplicate=dup)}
    tied = names(False) - names(True)
    return {k[len("janus."):]: v for k, v in sd.items() if k.startswith("janus.") and k[len("janus."):] not in tied}


# checkpoints: crash-safe folders, the trainer state, resume


def atomic_dir(path, write):
    """Write a folder crash-safely: into path.tmp, fsynced, then renamed over path. A kill at any point leaves
    path whole (old or new) or, between the two renames, path.old, which recover() puts back."""
    tmp, old = path + ".tmp", path + ".old"
    recover(path)  # a kill of the last save may have left path.old or path.tmp behind
    os.makedirs(tmp)
    try:
        write(tmp)
        for d, _, files in os.walk(tmp):  # the data is on disk before a rename makes it the checkpoint
            _fsync(*(os.path.join(d, f) for f in files), d)
    except Exception:  # a failed write (disk full): the previous checkpoint stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))  # the renames themselves survive a power cut
    shutil.rmtree(old, ignore_errors=True)


def recover(path):
    """Undo a killed atomic_dir: path.old back if path is missing, leftover path.tmp / path.old removed."""
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        with contextlib.suppress(FileNotFoundError):  # another rank may have done it first
            os.replace(path + ".old", path)
    for leftover in (path + ".tmp", path + ".old"):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync(*paths):
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_checkpoint(path):
    """The one test of "a model checkpoint is here", full weights (config.json) or LoRA adapters
    (adapter_config.json): stage skipping, eval.py, --benchmark, the probes and bench all ask this."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json"))


def save_checkpoint(model, path, state):
    """Full weights, or a LoRA model's adapters alone (a few MB for 7B), whose adapter_config.json names their base
    (relative to `path` when local, so out_dir can move); load_model reads either kind. The master writes; the
    others wait, so that none reads a checkpoint still being written."""
    full = full_state_dict(model)  # FSDP: every rank takes part in the gather

    def write(d):
        if getattr(model, "lora", None) is not None:
            conf = model.lora.peft_config["default"]
            base = conf.base_model_name_or_path
            conf.base_model_name_or_path = os.path.relpath(base, path) if os.path.isdir(base) else base
            model.lora.save_pretrained(d, save_embedding_layers=False)  # False: "auto" would query the hub
            conf.base_model_name_or_path = base
        else:
            model.janus.save_pretrained(d, state_dict=full)  # an ordinary folder, sharded run or not
        model.tokenizer.save_pretrained(d)
        torch.save(state, os.path.join(d, "trainer_state.pt"))
    if rank() == 0:
        atomic_dir(path, write)
    barrier()


def load_state(path):
    recover(path)
    f = os.path.join(path, "trainer_state.pt")
    return torch.load(f, weights_only=False) if os.path.exists(f) else None


def trainer_state(opt, it, cfg, samplers=(), model=None):
    """What a run needs to resume as if never stopped, besides the weights: the iteration, AdamW's moments
    (gathered to the master under FSDP, a collective), the prompt samplers' and torch's RNG, and the config."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    if model is not None and is_sharded(model.parameters()):
        adamw = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        adamw = opt.state_dict()
    return dict(iter=it, optimizer=adamw, rng=torch.get_rng_state(), samplers=[s.getstate() for s in samplers],
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None, config=vars(cfg))


def resume(opt, state, samplers=(), model=None):
    """Restore a trainer_state into the optimizer, torch's RNG and the prompt samplers; the iteration to go on from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if not state:
        return 0
    if model is not None and is_sharded(model.parameters()):  # every rank read the full state
        set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    cuda_rng = state.get("cuda_rng")
    if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if len(state.get("samplers", ())) == len(samplers):
        for s, saved in zip(samplers, state.get("samplers", ())):
            s.setstate(saved)
    else:
        print("resume: an older checkpoint without the prompt samplers' states; the prompt stream starts again")
    return state["iter"]


# how a run is driven or logged, not what it computes: free to change on resume
RESUME_FREE = {"out_dir", "stage", "dry_run", "preset", "log_interval", "ckpt_interval", "storyboard_interval",
               "eval_prompts", "eval_interval", "run_eval_prompts", "eval_data", "micro_batch", "device", "cpu_threads",
               "grad_checkpointing", "fsdp", "wandb_log", "wandb_project", "wandb_run_name", "tensorboard"}
RESUME_NOTED = {"lr", "warmup_lr", "grpo_iters", "warmup_iters"}  # accepted with a note: they apply from here on
# shaped the prepared world and the warm-up, done by the time GRPO resumes
ONLY_BEFORE_GRPO = {"model", "vq_steps", "clip_steps", "warmup_iters", "warmup_batch_size", "warmup_lr", "warmup_rise",
                    "n_understanding", "interleaved_ratio", "warmup_data", "cfg_dropout", "warmup_stall"}
ONLY_GRPO = {"temperature", "cfg_scale", "max_new_tokens", "max_text_tokens", "max_images", "grpo_iters",
             "prompts_per_step", "group_size", "lr", "inner_epochs", "clip_eps", "kl_beta", "loss_type",
             "use_format_reward", "use_text_reward", "use_visual_reward", "process_reward", "scale_rewards",
             "visual_scorer", "text_critic", "rl_tasks", "rl_data"}


def stopped_run(cfg, stage, iters):
    """(done, state): whether out_dir holds `stage` complete, else the trainer state a stopped run left there (None:
    a fresh start), its flags checked against this run's before any model is loaded."""
    path = os.path.join(cfg.out_dir, stage)
    state = load_state(path)
    if state and state["iter"] >= iters:
        print(f"{'warm-up' if stage == 'warmup' else stage}: complete checkpoint found in {path}")
        return True, state
    if state:
        check_resume(cfg, state, stage, path)
    return False, state


def check_resume(cfg, state, stage, path):
    """A resumed run is the run that was stopped: a changed flag that shapes it is refused, by name."""
    saved = state.get("config")
    if saved is None:
        return print(f"{stage}: {path} records no config (an older checkpoint); resuming without checking the flags")
    skip = RESUME_FREE | (ONLY_BEFORE_GRPO if stage == "grpo" else ONLY_GRPO)
    changed = [k for k in DEFAULTS if k not in skip and k in saved and saved[k] != getattr(cfg, k)]
    refused = [k for k in changed if k not in RESUME_NOTED]
    if refused:
        fail(f"{path} (iter {state['iter']}) was trained with " + ", ".join(f"--{k}={saved[k]!r}" for k in refused)
             + "; this run has " + ", ".join(f"--{k}={getattr(cfg, k)!r}" for k in refused)
             + ". Resume it with the same values, or start another run with a new --out_dir")
    for k in changed:
        print(f"{stage}: --{k}={getattr(cfg, k)!r} (the checkpoint's run had {saved[k]!r}): "
              f"applies from iter {state['iter']} on")


def trim_metrics(cfg, stage, start):
    """Drop the metrics rows of `stage` at iter >= start (written after the checkpoint by a killed run, and logged
    again now) and a torn last line, so metrics.jsonl holds one row per iteration."""
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rank() > 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):  # a torn line: the kill came mid-write
            row = json.loads(line)
            if not (row.get("stage") == stage and row.get("iter", -1) >= start):
                keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) < len(lines):
        print(f"{stage}: dropped {len(lines) - len(keep)} metrics row(s) past iter {start} from {path}; "
              "they are logged again")
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)


# logging: metrics.jsonl (the source of truth), optional trackers, one line per row on the console


def _need(module, flag, package):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"error: --{flag} needs the {package} package: pip install {package}") from None


def trackers(cfg):
    """Optional mirrors of metrics.jsonl, imported only when asked for: one callable per row."""
    sinks, scalars = [], lambda row: {f"{row['stage']}/{k}": v for k, v in row.items() if type(v) in (int, float)}
    if cfg.wandb_log:
        run = _need("wandb", "wandb_log", "wandb").init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                                         config=vars(cfg), dir=cfg.out_dir)
        sinks.append(lambda row: run.log(scalars(row)))
    if cfg.tensorboard:
        tb = _need("torch.utils.tensorboard", "tensorboard", "tensorboard")
        writer = tb.SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))

        def to_tensorboard(row):
            for k, v in scalars(row).items():
                writer.add_scalar(k, v, row["iter"])
            writer.flush()
        sinks.append(to_tensorboard)
    return sinks


def make_logger(cfg):
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    sinks = trackers(cfg) if rank() == 0 else []
    keys = ("loss", "reward", "rewards/format/mean", "rewards/text/mean", "rewards/visual/mean", "kl", "clip_ratio",
            "eval/oracle_step", "eval/reward", "eval/format", "eval/understanding_acc", "eval/t2i_acc")

    def log(row):  # rows arrive already averaged over ranks; the master writes them
        if rank() > 0:
            return
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for sink in sinks:
            sink(row)
        msg = " ".join(f"{k.split('/')[1] if '/' in k else k} {row[k]:.4f}" for k in keys if k in row)
        secs = sum(v for k, v in row.items() if k.startswith("time/")) or row.get("sec", 0)
        held_out = "held-out: " if "eval/reward" in row else ""
        tqdm.write(f"[{row['stage']}] iter {row['iter']}: {held_out}{msg} | {secs:.2f}s")
    return log


# memory per GPU on paper (--dry_run). Janus-Pro's language trunks (DeepSeek-LLM, as in the released config.json):
# hidden, MLP, layers, heads. Both have a 102400-token vocabulary, SigLIP-L/16 at 384 px for understanding and a
# 16384-code VQ for generation (transformers' JanusConfig defaults): 2.08B and 7.41B parameters in all.
JANUS_PRO = {"janus-pro-1b": (2048, 5632, 24, 16), "janus-pro-7b": (4096, 11008, 30, 32)}


def janus_pro_config(name):
    """Janus-Pro's architecture written out (no download): for --dry_run and tests/gpu_check.py."""
    from transformers import JanusConfig
    H, I, L, A = JANUS_PRO[name]
    return JanusConfig(text_config=dict(model_type="llama", hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                        num_attention_heads=A, num_key_value_heads=A, vocab_size=102400,
                                        max_position_embeddings=16384, tie_word_embeddings=False),
                       vision_config=dict(projection_dim=H), vq_config=dict(projection_dim=H, image_token_embed_dim=H),
                       tie_word_embeddings=False)


def memory_estimate(cfg):
    """Bytes per GPU, (full fine-tune under DDP, full under FSDP, LoRA) per row, from the architecture alone: the
    model is built on the meta device, so no weights are loaded and nothing is downloaded. None for an unknown model."""
    from transformers import JanusConfig, JanusForConditionalGeneration
    name = cfg.model.rstrip("/").rsplit("/", 1)[-1].lower()
    if name in JANUS_PRO:
        config = janus_pro_config(name)
    elif os.path.exists(os.path.join(cfg.model, "config.json")):
        config = JanusConfig.from_pretrained(cfg.model)
    else:
        return None
    with torch.device("meta"):
        janus = JanusForConditionalGeneration(config)
    count = lambda module: sum(p.numel() for p in module.parameters())
    n_all, n_vq, n_layers = count(janus), count(janus.model.vqmodel), count(janus.model.language_model.layers)
    n_train = n_all - n_vq  # the VQ stays frozen (and whole on every rank under FSDP)
    lora_r = cfg.lora_rank or 64  # the LoRA column assumes rank 64 when LoRA is off
    n_lora = sum(lora_r * (m.in_features + m.out_features) for m in janus.model.language_model.layers.modules()
                 if isinstance(m, torch.nn.Linear))  # adapters on every linear layer of the trunk
    lm, world = config.text_config, int(os.environ.get("WORLD_SIZE", 1))
    H, L = lm.hidden_size, lm.num_hidden_layers
    kv_dim = lm.num_key_value_heads * H // lm.num_attention_heads
    rows = cfg.prompts_per_step * cfg.group_size // world  # rollouts per GPU, all in one forward
    n_img = min(cfg.max_images * config.vq_config.num_patches ** 2, cfg.max_new_tokens)  # image tokens per rollout
    T = 256 + cfg.max_new_tokens  # a 256-token prompt; every rollout at its token budget
    a = 2 if cfg.dtype == "bfloat16" else 4  # bytes per activation (autocast) and per frozen weight
    layer = (10 * H + 4 * lm.intermediate_size) * a  # saved per token per layer: norms, q/k/v/o, MLP (SDPA: no TxT)
    acts = rows * T * (L * H * a + layer if cfg.grad_checkpointing else L * layer)
    # float32 logits, their temperature-scaled copy and the log-softmax kept for backward: ~12 bytes each
    logits = rows * ((cfg.max_new_tokens - n_img) * lm.vocab_size + n_img * config.vq_config.num_embeddings) * 12
    shard = 4 * n_train / world + 4 * n_vq  # FSDP: float32 weights split over the ranks, the VQ whole
    table = {"weights": (4 * n_all, shard, a * n_all + 4 * n_lora),
             "gradients": (4 * n_train, 4 * n_train / world, 4 * n_lora),
             "AdamW states": (8 * n_train, 8 * n_train / world, 8 * n_lora),
             "reference model": (4 * n_all * (cfg.kl_beta > 0), shard * (cfg.kl_beta > 0), 0),
             "activations": (acts,) * 3, "logits": (logits,) * 3,
             "sampling KV cache": (2 * L * rows * T * kv_dim * a,) * 3,
             # FSDP gathers float32 weights: the root and ~2 layers during the update, everything while sampling
             "gathered (FSDP): update": (0, 4 * (n_train - n_layers + 2 * n_layers / L), 0),
             "gathered (FSDP): sampling": (0, 4 * n_train, 0)}
    peak = tuple(sum(table[k][i] for k in ("weights", "gradients", "AdamW states", "reference model"))
                 + max(table["activations"][i] + table["logits"][i] + table["gathered (FSDP): update"][i],
                       table["sampling KV cache"][i] + table["gathered (FSDP): sampling"][i]) for i in range(3))
    return dict(name=name, params=n_all, lora_params=n_lora, lora_rank=lora_r, world=world, rows=rows, tokens=T,
                table=table, peak=peak, selected="LoRA" if cfg.lora_rank else "FSDP" if cfg.fsdp else "full fine-tune")


def format_memory(est):
    if est is None:
        return "memory estimate: only for --preset janus-pro-1b / janus-pro-7b or a local --model folder"
    gb = lambda pair: "".join(f"{x / 1e9:14.1f}" for x in pair)
    lines = [f"memory per GPU on paper, GB: {est['name']} ({est['params'] / 1e9:.2f}B parameters), {est['world']} "
             f"GPU(s) (WORLD_SIZE), {est['rows']} rollouts per GPU of up to {est['tokens']} tokens",
             f"{'this config: ' + est['selected']:30}{'full (DDP)':>14}{'full (FSDP)':>14}"
             f"{'LoRA r=' + str(est['lora_rank']):>14}"]
    lines += [f"{k:30}{gb(v)}" for k, v in est["table"].items()] + [f"{'peak':30}{gb(est['peak'])}"]
    return "\n".join(lines + [
        f"full: float32 weights, gradients, AdamW (bf16 autocast), a float32 reference copy; DDP keeps them on every "
        f"GPU, --fsdp splits them over the {est['world']} GPU(s) (the frozen VQ stays whole); LoRA: the base in "
        f"--dtype, {est['lora_params'] / 1e6:.0f}M float32 adapter weights on the trunk's linear layers, no reference "
        "copy (adapters off).",
        "activations: saved per token (only layer inputs with --grad_checkpointing), SDPA; peak = resident + the "
        "larger of activations + logits (+ FSDP's gathered root and layers) and the sampling KV cache (+ FSDP's "
        "gathered weights); not counted: reward models (ViT-L-14 ~1.7 GB, a 7B critic ~16 GB in bf16), CUDA "
        "context, fragmentation."])


# =============================================================================
# END OF PLUMBING. The interleaved sampler


@dataclass
class Trajectories:
    """A batch of (prompt, answer) token records: rollouts the policy sampled (sample_interleaved) or data to
    teacher-force (make_batch: segment 0, logp 0, every row finished). Left-padded prompts, right-padded answers;
    per answer token its id, modality, segment (the index of the text segment or image it belongs to, the unit
    of the process reward), the log-prob it was sampled with, and whether it was sampled."""
    prompt_ids: torch.Tensor      # [B, P] left-padded
    prompt_mask: torch.Tensor     # [B, P]
    context: list                 # per row: list of [3,H,W] context image tensors
    ids: torch.Tensor             # [B, T] generated tokens (text ids or VQ codes)
    is_image: torch.Tensor        # [B, T] bool, modality of each token
    segment: torch.Tensor         # [B, T] which text segment / image a token belongs to (0, 1, 2, ...)
    logp: torch.Tensor            # [B, T] log-prob under the sampling policy (0 where not sampled)
    mask: torch.Tensor            # [B, T] 1 for sampled tokens; 0 for forced <end_of_image> and padding
    finished: torch.Tensor        # [B] bool: ended with EOS inside the limits


def trajectory_rows(ro, rows):
    """Rows `rows` (a LongTensor of indices) of a batch, without the columns that are padding in all of them."""
    keep = ro.prompt_mask[rows].any(0).nonzero()
    P0 = int(keep[0]) if len(keep) else ro.prompt_mask.shape[1]
    used = ro.mask[rows].any(0).nonzero()
    T = int(used[-1]) + 1 if len(used) else 1
    cut = lambda t: t[rows, :T]
    return Trajectories(ro.prompt_ids[rows, P0:], ro.prompt_mask[rows, P0:], [ro.context[i] for i in rows.tolist()],
                        cut(ro.ids), cut(ro.is_image), cut(ro.segment), cut(ro.logp), cut(ro.mask), ro.finished[rows])


def pad_prompts(model, prompts):
    enc = [model.encode_prompt(p) for p in prompts]
    P = max(len(ids) for ids, _ in enc)
    prompt_ids = torch.full((len(enc), P), model.pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(len(enc), P, dtype=torch.long)
    for i, (ids, _) in enumerate(enc):  # left padding: every row's next token sits at the same column
        prompt_ids[i, P - len(ids):], prompt_mask[i, P - len(ids):] = torch.tensor(ids), 1
    return prompt_ids, prompt_mask, [px for _, px in enc]


def _stack_context(context, device):
    flat = [x for row in context for x in row]
    return torch.stack(flat).to(device) if flat else None


def unconditional_ids(model, ids, is_image):
    """CFG's unconditional branch: every text token (prompt and generated) becomes <pad>; BOS, image codes, context
    images and the image markers stay. Janus's recipe for one image, carried to interleaved output: earlier
    images are in both branches, so guidance amplifies what the text asks for."""
    keep = is_image | (ids == model.bos_id) | (ids == model.boi_id) | (ids == model.eoi_id) | (ids == model.image_id)
    return torch.where(keep, ids, model.pad_id)


def head_logprobs(model, h, image, temperature, h_uncond=None, cfg_scale=1.0):
    """log pi(. | h) for one modality, the one distribution of the sampler and sequence_logprobs: text from the LM
    head; image codes from the generation head, guided l_u + s (l_c - l_u) if h_uncond is given."""
    if not image:
        return torch.log_softmax(model.text_logits(h).float() / temperature, dim=-1)
    logits = model.image_logits(h).float()
    if h_uncond is not None:
        uncond = model.image_logits(h_uncond).float()
        logits = uncond + cfg_scale * (logits - uncond)
    return torch.log_softmax(logits / temperature, dim=-1)


def kv_cache(n_layers, capacity):
    """A transformers Cache whose layers write into buffers sized for the whole rollout. The default
    DynamicCache concatenates: it copies every layer's keys and values at each decoded token, and holds
    two copies while it does."""
    from transformers.cache_utils import Cache, DynamicLayer

    class BufferLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)  # dtype, device, is_initialized
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            self.k_buf, self.v_buf, self.length = key_states.new_empty(shape), value_states.new_empty(shape), 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            self.k_buf[:, :, self.length:end], self.v_buf[:, :, self.length:end] = key_states, value_states
            self.keys, self.values, self.length = self.k_buf[:, :, :end], self.v_buf[:, :, :end], end
            return self.keys, self.values

        def keep_rows(self, rows):  # the sampler's row changes (a shared prefill, finished rows); filled columns only
            for name in ("k_buf", "v_buf"):
                buf = getattr(self, name)
                kept = buf.new_empty((len(rows), *buf.shape[1:]))
                kept[:, :, :self.length] = buf[rows, :, :self.length]
                setattr(self, name, kept)
            self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]

    return Cache(layers=[BufferLayer() for _ in range(n_layers)])


def sample_interleaved(model, *args, **kwargs):
    """_sample_interleaved through model.forward, with FSDP's weights gathered once for all decoded tokens."""
    with gathered(model):
        return model(_sample_interleaved, *args, **kwargs)


@torch.no_grad()
def _sample_interleaved(model, prompts, temperature=1.0, max_new_tokens=128, max_text_tokens=32, max_images=4,
                        generator=None, cfg_scale=1.0):
    """Batched interleaved decoding with a KV cache; one forward serves all rows, text-mode rows read the LM head,
    image-mode rows the generation head. The model opens an image with <begin_of_image>; then n_image_tokens codes
    are sampled and <end_of_image> is forced; a row stops at EOS or a limit. CFG: rows B..2B-1 are the
    unconditional twins of rows 0..B-1 (through text too: any segment may open an image). `generator`: one, or
    a list with one per group of rows (a group's draws then ignore the batch: DDP)."""
    dev = model.device
    # rows given one prompt object (a GRPO group's G rollouts) share its prefill: it runs once, then the KV cache
    # and the last hidden state are copied to each of the rows
    first = {}
    src = torch.tensor([first.setdefault(id(p), len(first)) for p in prompts], device=dev)
    prompt_ids, prompt_mask, context = pad_prompts(model, list({id(p): p for p in prompts}.values()))
    prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
    B, U, N, guided = len(prompts), len(first), model.n_image_tokens, cfg_scale != 1
    no_image = torch.zeros_like(prompt_ids, dtype=torch.bool)
    if guided:
        prompt_ids = torch.cat([prompt_ids, unconditional_ids(model, prompt_ids, no_image)])
        prompt_mask, no_image, context = prompt_mask.repeat(2, 1), no_image.repeat(2, 1), context * 2
        src = torch.cat([src, src + U])  # the unconditional twins come after the prompts
    P = prompt_ids.shape[1]
    cache = kv_cache(model.janus.config.text_config.num_hidden_layers, P + max_new_tokens)
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    h = model.trunk(model.embed(prompt_ids, no_image), prompt_mask, pos, cache,
                    _stack_context(context, dev), prompt_ids == model.image_id)[:, -1]
    if U < B:
        for layer in cache.layers:
            layer.keep_rows(src)
        prompt_ids, prompt_mask, pos, h = prompt_ids[src], prompt_mask[src], pos[src], h[src]
        context = [context[j] for j in src.tolist()]
    attn = torch.cat([prompt_mask, prompt_mask.new_ones(len(prompt_mask), max_new_tokens)], 1).bool()  # sliced below
    next_pos = pos[:, -1] + 1
    # per-row state, for the rows still writing: a finished row leaves the batch (and the KV cache) once a quarter
    # of the batch has finished, so its tokens cost nothing (GRPO's rows end at very different lengths)
    live = torch.arange(B, device=dev)  # the rollout row of each batch row
    zeros = lambda dtype: torch.zeros(B, dtype=dtype, device=dev)
    img_left = zeros(torch.long)   # image codes still to sample (image mode if > 0)
    force_eoi = zeros(torch.bool)  # the grid is full: the next token is <end_of_image>
    n_images, segment = zeros(torch.long), zeros(torch.long)
    seg_len = zeros(torch.long)    # tokens in the current text segment
    done, ended = zeros(torch.bool), zeros(torch.bool)  # ended: with EOS, inside the limits
    last_segment = zeros(torch.long)  # every rollout row's segment: a finished row's padding keeps its last one
    full = lambda v, pad: v if len(live) == B else v.new_full((B,), pad).index_copy_(0, live, v)  # + finished rows
    out = {k: [] for k in ("ids", "is_image", "segment", "logp", "mask")}
    V = max(model.janus.config.text_config.vocab_size, model.janus.config.vq_config.num_embeddings)
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    for i in range(max_new_tokens):
        # Gumbel-max: argmax(log p + g) is a draw from p. g is drawn for every rollout row at every position, so a
        # row's stream does not depend on the other rows' modes or lengths
        u = torch.cat([torch.rand(B // len(gens), V, generator=g, device=dev) for g in gens])[live]
        gumbel = -torch.log(-torch.log(u))
        b = len(live)
        in_image = (img_left > 0) & ~done
        in_text = ~in_image & ~force_eoi & ~done
        tok = torch.full((b,), model.pad_id, dtype=torch.long, device=dev)
        lp = torch.zeros(b, device=dev)
        for rows, image in ((in_text, False), (in_image, True)):
            if rows.any():  # each head only on the rows in its mode
                h_uncond = h[b:][rows] if guided else None
                logp_all = head_logprobs(model, h[:b][rows], image, temperature, h_uncond, cfg_scale)
                t = (logp_all + gumbel[rows, :logp_all.shape[-1]]).argmax(-1)
                tok[rows], lp[rows] = t, logp_all.gather(-1, t[:, None]).squeeze(-1)
        tok = torch.where(force_eoi & ~done, model.eoi_id, tok)
        last_segment[live] = segment
        for k, v in zip(out, (full(tok, model.pad_id), full(in_image, False), last_segment.clone(), full(lp, 0.0),
                              full((in_text | in_image).float(), 0.0))):
            out[k].append(v)  # a token's segment is the one it belongs to: <boi> and <eoi> close the text / image
        opens, ends = in_text & (tok == model.boi_id), in_text & (tok == model.eos_id)
        seg_len = torch.where(in_text, seg_len + 1, seg_len)
        too_many = opens & (n_images >= max_images)
        runaway = in_text & ~opens & ~ends & (seg_len >= max_text_tokens)
        ended[live] |= ends
        done = done | ends | too_many | runaway
        # mode changes: <boi> -> image mode, a new segment; full grid -> force <eoi>; <eoi> -> text, a new segment
        start, closing = opens & ~done, force_eoi & ~done
        img_left = torch.where(start, N, torch.where(in_image, img_left - 1, img_left))
        n_images = n_images + start.long()
        segment = segment + start.long() + closing.long()
        seg_len = torch.where(closing, 0, seg_len)
        force_eoi = in_image & (img_left == 0)
        if done.all() or i + 1 == max_new_tokens:  # no forward for a token that will not be sampled
            break
        tok_in, img_in = tok, in_image
        if 4 * done.sum() >= b:  # drop the finished rows
            keep = (~done).nonzero().squeeze(1)
            both = torch.cat([keep, keep + b]) if guided else keep
            for layer in cache.layers:
                layer.keep_rows(both)
            live, attn, next_pos = live[keep], attn[both], next_pos[both]
            tok_in, img_in = tok[keep], in_image[keep]
            img_left, force_eoi, n_images, segment, seg_len, done = (
                t[keep] for t in (img_left, force_eoi, n_images, segment, seg_len, done))
        if guided:
            tok_in, img_in = torch.cat([tok_in, unconditional_ids(model, tok_in, img_in)]), img_in.repeat(2)
        # a ready 4D mask: transformers would rebuild it from the 2D one at every position
        mask = attn[:, None, None, :P + i + 1]
        h = model.trunk(model.embed(tok_in[:, None], img_in[:, None]), mask, next_pos[:, None], cache)[:, -1]
        next_pos = next_pos + 1
    st = {k: torch.stack(v, 1) for k, v in out.items()}
    return Trajectories(prompt_ids[:B], prompt_mask[:B], context[:B], **st, finished=ended)


def decode_rollout(model, ro):
    """Sampled trajectories -> per row (segments, segment index of each): ("text", str), ("image", PIL) for a full
    grid, ("image", None) for one cut short; an empty text segment stays only if it opens an image (for r_f)."""
    N, special = model.n_image_tokens, {model.boi_id, model.eoi_id, model.eos_id, model.pad_id}
    rows, grids = [], []
    for b in range(ro.ids.shape[0]):
        valid = ro.mask[b].bool() | (~ro.is_image[b] & (ro.ids[b] == model.eoi_id))
        by_segment = {}
        for t, img, s in zip(ro.ids[b][valid].tolist(), ro.is_image[b][valid].tolist(), ro.segment[b][valid].tolist()):
            by_segment.setdefault(s, []).append((t, img))
        segs, index = [], []
        for s, toks in sorted(by_segment.items()):
            codes = [t for t, img in toks if img]
            if codes:
                if len(codes) == N:
                    grids.append((b, len(segs), codes))
                segs.append(("image", None))
            else:
                words = [t for t, _ in toks if t not in special]
                text = model.tokenizer.decode(words, skip_special_tokens=True).strip()
                if not text and all(t != model.boi_id for t, _ in toks):
                    continue
                segs.append(("text", text))
            index.append(s)
        rows.append((segs, index))
    if grids:
        for (b, i, _), im in zip(grids, model.vq_decode(torch.tensor([g for _, _, g in grids]))):
            rows[b][0][i] = ("image", im)
    return rows


def write_storyboard(model, cfg, stage_name, it, n=6):
    """Sample a few held-out prompts; data.save_storyboard draws them (master only; under FSDP every rank samples,
    since gathering the weights is a collective)."""
    if rank() > 0 and not is_sharded(model.parameters()):
        return
    files = [f for f in (cfg.eval_data, cfg.rl_data) if f]
    make = lambda task: data.make_examples(task, n // 2, "eval", seed=cfg.seed, image_size=cfg.image_size)
    examples = data.load_prompts(files[0])[:n] if files else make("story") + make("howto")
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed)
    ro = sample_interleaved(model, [e.prompt for e in examples], cfg.temperature, cfg.max_new_tokens,
                            cfg.max_text_tokens, cfg.max_images, generator=gen, cfg_scale=cfg.cfg_scale)
    if rank() > 0:
        return
    os.makedirs(os.path.join(cfg.out_dir, "storyboards"), exist_ok=True)
    stories = [(" ".join(x for k, x in e.prompt if k == "text"), segs)
               for e, (segs, _) in zip(examples, decode_rollout(model, ro))]
    path = os.path.join(cfg.out_dir, "storyboards", f"{stage_name}_{it:05d}")
    data.save_storyboard(path, f"{stage_name} iter {it}", stories)


# -----------------------------------------------------------------------------
# Teacher-forced log-probs over both heads (the warm-up, the policy's update and the reference)


def sequence_logprobs(model, *args, **kwargs):
    """_sequence_logprobs through model.forward (FSDP's hooks)."""
    return model(_sequence_logprobs, *args, **kwargs)


def _sequence_logprobs(model, ro, temperature=1.0, with_entropy=False, cfg_scale=1.0, group_size=1):
    """log pi(o_t | q, o_<t) of every generated token, with the sampler's temperature and guidance, so that
    on-policy the ratio is exactly 1. The hidden state at <begin_of_image> predicts image code 0. With CFG the
    gradient flows through both branches: the policy optimised is the guided one that sampled. group_size G > 1:
    rows k*G .. k*G+G-1 share one prompt (a GRPO group), which runs once."""
    dev = model.device
    tgt, img = ro.ids.to(dev), ro.is_image.to(dev)
    B, guided = len(tgt), cfg_scale != 1 and bool(img.any())
    # the hidden states that predict the generated tokens [B, T, D] (CFG: the unconditional twins' below them)
    h, inputs = grouped_states(model, ro, guided, group_size) if group_size > 1 else packed_states(model, ro, guided)
    if torch.is_grad_enabled():  # which optional parts this rank's gradient reaches (drop_unused_grads, FSDP)
        model.grad_paths = getattr(model, "grad_paths", set()) | {k for k, on in (
            ("vision", any(ro.context)), ("image_in", inputs), ("image_out", bool(img.any()))) if on}
    logp = torch.zeros(tgt.shape, device=dev)
    ent = torch.zeros(tgt.shape, device=dev) if with_entropy else None
    for rows, image in ((~img, False), (img, True)):
        if rows.any():
            lsm = head_logprobs(model, h[:B][rows], image, temperature, h[B:][rows] if guided else None, cfg_scale)
            logp[rows] = lsm.gather(-1, tgt[rows][:, None]).squeeze(-1)
            if with_entropy:
                ent[rows] = -(lsm.exp() * lsm).sum(-1).detach()
    return logp, ent


def packed_states(model, ro, guided):
    """The trunk's states that predict each answer token, and whether image codes were among its inputs. Each row's
    prompt and answer run from column 0, padding only at its end: left-padded prompts beside right-padded answers
    would pad every row to the longest prompt plus the longest answer (README, "Speed")."""
    dev = model.device
    tgt, img = ro.ids.to(dev), ro.is_image.to(dev)
    (P, T), n_prompt = ro.prompt_ids.shape[1:] + ro.ids.shape[1:], ro.prompt_mask.sum(1).to(dev)
    length = n_prompt + torch.where(ro.mask.to(dev).bool(), torch.arange(1, T + 1, device=dev), 0).amax(1)
    cols = torch.arange(int(length.max()), device=dev)  # a row ends at its last sampled token
    src = (cols + (P - n_prompt)[:, None]).clamp(max=P + T - 1)
    pack = lambda prompt, answer: torch.cat([prompt.to(dev), answer.to(dev)], 1).gather(1, src)
    ids = pack(ro.prompt_ids, tgt)
    is_image = pack(torch.zeros_like(ro.prompt_ids, dtype=torch.bool), img)
    placeholders, context = pack(ro.prompt_ids == model.image_id, torch.zeros_like(img)), ro.context
    attn = (cols < length[:, None]).long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    if guided:
        ids = torch.cat([ids, unconditional_ids(model, ids, is_image)])
        is_image, attn, pos, placeholders = (t.repeat(2, 1) for t in (is_image, attn, pos, placeholders))
        context = context * 2
    h = model.trunk(model.embed(ids, is_image), attn, pos, None, _stack_context(context, dev), placeholders)
    # answer token t of a row follows its prompt's last token
    at = (n_prompt[:, None] - 1 + torch.arange(T, device=dev)).clamp(max=len(cols) - 1)  # past its end: masked
    return h.gather(1, (at.repeat(2, 1) if guided else at)[..., None].expand(-1, -1, h.shape[-1])), bool(is_image.any())


def grouped_states(model, ro, guided, G):
    """packed_states for rows in groups of G that share a prompt: the prompt runs once, and its keys and values
    (gradient and all) serve the G answers, which run after it. A default GRPO batch's prompts are 45% of its
    tokens. Answers are right-padded; padding only follows the tokens that are scored (causal attention)."""
    from transformers import DynamicCache
    dev, (P, T) = model.device, ro.prompt_ids.shape[1:] + ro.ids.shape[1:]
    if not torch.equal(ro.prompt_ids.view(-1, G, P), ro.prompt_ids[::G, None].expand(-1, G, -1)):
        raise ValueError(f"grouped_states: rows in groups of {G} must share their prompt (a GRPO group's rollouts)")
    each = lambda x: x[:, None].expand(-1, G, *x.shape[1:]).flatten(0, 1)  # a prompt's row -> its G rows (CFG too)
    ids, mask, context = ro.prompt_ids[::G].to(dev), ro.prompt_mask[::G].to(dev), ro.context[::G]
    no_image = torch.zeros_like(ids, dtype=torch.bool)
    answer, is_image = ro.ids[:, :-1].to(dev), ro.is_image[:, :-1].to(dev)  # the last token predicts nothing
    if guided:
        ids = torch.cat([ids, unconditional_ids(model, ids, no_image)])
        answer = torch.cat([answer, unconditional_ids(model, answer, is_image)])
        mask, no_image, is_image, context = mask.repeat(2, 1), no_image.repeat(2, 1), is_image.repeat(2, 1), context * 2
    cache, pos = DynamicCache(), (mask.cumsum(-1) - 1).clamp(min=0)
    last = each(model.trunk(model.embed(ids, no_image), mask, pos, cache, _stack_context(context, dev),
                            ids == model.image_id)[:, -1:])  # predicts answer token 0
    if T == 1:
        return last, False
    for layer in cache.layers:  # expand, not index: the gradient is then a sum over the G rows, not a scatter
        layer.keys, layer.values = each(layer.keys), each(layer.values)
    attn = torch.cat([each(mask), torch.ones_like(answer)], 1)
    h = model.trunk(model.embed(answer, is_image), attn, each(pos[:, -1:]) + 1 + torch.arange(T - 1, device=dev), cache)
    return torch.cat([last, h], 1), bool(is_image.any())


def reference_logprobs(ref, ro, cfg, group_size=1):
    """log pi_ref of a rollout, no graph. With LoRA, ref is the policy with its adapters off (no second copy)."""
    off = ref.lora.disable_adapter() if getattr(ref, "lora", None) is not None else contextlib.nullcontext()
    with torch.no_grad(), off:
        return sequence_logprobs(ref, ro, cfg.temperature, cfg_scale=cfg.cfg_scale, group_size=group_size)[0]


# -----------------------------------------------------------------------------
# GRPO maths: each equation of docs/method.md, once


def group_advantages(rewards, group_size, eps=1e-4, scale="group"):
    """Outcome advantage A_i = (R_i - mean(R)) / std(R) within each group of G rollouts of one prompt. std is the
    unbiased one, as in TRL; eps keeps an all-equal group at exactly 0 (not NaN). scale="batch" divides by one
    std for the whole batch, that of the rewards around their group means: a group whose rollouts differ only
    by reward-model noise then stays small instead of being scaled up to 1."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if scale == "group" else centred.pow(2).sum().div(r.numel() - 1).sqrt()
    return (centred / (std + eps)).view(-1)


def process_advantages(step_rewards, token_segment, group_size, eps=1e-4, scale="group"):
    """DeepSeekMath process supervision, one step per segment: normalise every step reward of the group by the
    mean/std of that collection, then give token t the sum of the normalised rewards of the segments that end at
    or after t. step_rewards: [B, S], NaN where a row has no such segment; token_segment: [B, T]
    (Trajectories.segment). scale="batch": one std for the batch, as in group_advantages."""
    B, S = step_rewards.shape
    r = step_rewards.view(-1, group_size * S)
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, r, 0.0).sum(1, keepdim=True) / n
    sq = torch.where(valid, (r - mean) ** 2, 0.0)
    if scale == "group":
        var = sq.sum(1, keepdim=True) / (n - 1).clamp(min=1)
    else:
        var = sq.sum() / (valid.sum() - 1).clamp(min=1)
    norm = torch.where(valid, (r - mean) / (var.sqrt() + eps), 0.0).view(B, S)
    suffix = norm.flip(1).cumsum(1).flip(1)  # suffix[j] = sum of normalised rewards of segments >= j
    suffix = torch.cat([suffix, torch.zeros(B, 1)], 1)  # tokens past the last segment get 0
    return suffix.gather(1, token_segment.clamp(max=S))


def k3_kl(logp, ref_logp):
    """Unbiased, always-positive KL(pi_theta || pi_ref) estimator per token (Schulman's k3)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_beta=0.04, loss_type="sequence",
              n_tokens=None):
    """The unified clipped objective, over text and image tokens of one trajectory alike:
    J = mean_i 1/|o_i| sum_t [min(r A, clip(r, 1-eps, 1+eps) A) - beta KL_t]; returns -J and stats.
    ref_logp None (no reference model): no KL term. n_tokens: the token-level denominator (default mask.sum();
    under DDP the global count / world size)."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    kl = k3_kl(logp, ref_logp) if kl_beta > 0 and ref_logp is not None else torch.zeros_like(logp)
    per_token = surrogate - kl_beta * kl
    if loss_type == "sequence":  # the paper: average over each trajectory's tokens, then over trajectories
        J = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:  # token level (DAPO-style): long trajectories weigh more
        J = (per_token * mask).sum() / (mask.sum() if n_tokens is None else n_tokens).clamp(min=1)
    with torch.no_grad():
        m = mask.bool()
        clipped = ((ratio < 1 - clip_eps) & (advantages < 0)) | ((ratio > 1 + clip_eps) & (advantages > 0))
        mean = lambda t: t[m].float().mean().item() if m.any() else 0.0
        stats = dict(kl=mean(kl), clip_ratio=mean(clipped))
    return -J, stats


# -----------------------------------------------------------------------------
# Stage 1: warm-up on the hybrid mix


def make_batch(model, examples, answers=None):
    """Examples -> a batch of Trajectories to teacher-force (prompt left-padded, answer right-padded). `answers`
    may hold pre-encoded answers (VQ encoding once per data set, not once per iteration)."""
    prompt_ids, prompt_mask, context = pad_prompts(model, [e.prompt for e in examples])
    enc = answers if answers is not None else model.encode_answers([e.answer for e in examples])
    T = max(len(ids) for ids, _, _ in enc)
    ids = torch.full((len(enc), T), model.pad_id, dtype=torch.long)
    is_image = torch.zeros(len(enc), T, dtype=torch.bool)
    mask = torch.zeros(len(enc), T)
    for i, (a, b, c) in enumerate(enc):
        ids[i, :len(a)], is_image[i, :len(a)] = torch.tensor(a), torch.tensor(b)
        mask[i, :len(a)] = torch.tensor(c, dtype=torch.float)
    z, ones = torch.zeros_like(ids), torch.ones(len(enc), dtype=torch.bool)
    return Trajectories(prompt_ids, prompt_mask, context, ids, is_image, z, z.float(), mask, ones)


def drop_prompts(model, batch, rows):
    """CFG training (Janus: the prompt's text becomes <pad>): `rows` get the input the sampler's unconditional
    twin sees (unconditional_ids over prompt and answer) and train only their image tokens."""
    z = torch.zeros_like(batch.prompt_ids, dtype=torch.bool)
    batch.prompt_ids[rows] = unconditional_ids(model, batch.prompt_ids, z)[rows]
    batch.ids[rows] = unconditional_ids(model, batch.ids, batch.is_image)[rows]
    batch.mask[rows] = batch.mask[rows] * batch.is_image[rows]
    return batch


def warmup_step(model, opt, examples, answers, cfg, drop=None):
    """One stage-1 iteration: next-token NLL over text and image tokens, the token mean over the global batch. The
    batch runs as length_chunks (one loss, one gradient): padded together, the task families (lengths far apart)
    would make most of a batch padding. drop[i]: train example i as CFG's unconditional branch (drop_prompts).
    Returns (loss, sums, grad norm)."""
    dev = model.device
    size = lambda i: len(answers[i][0]) + sum(len(x.split()) if k == "text" else model.n_context_tokens + 2
                                              for k, x in examples[i].prompt)  # rough, for sorting only
    nll, st = 0.0, dict(nll_text=0.0, nll_image=0.0, n_text=0, n_image=0)
    for chunk in length_chunks([size(i) for i in range(len(examples))]):
        batch = make_batch(model, [examples[i] for i in chunk], [answers[i] for i in chunk])
        if drop is not None and any(drop[i] for i in chunk):
            batch = drop_prompts(model, batch, torch.tensor([drop[i] for i in chunk]))
        with autocast(cfg, dev):
            logp, _ = sequence_logprobs(model, batch)
        m = batch.mask.to(dev).bool()
        img = batch.is_image.to(dev) & m
        nll = nll - logp[m].sum()
        for kind, sel in (("text", m & ~img), ("image", img)):
            st["nll_" + kind] -= logp[sel].sum().item()
            st["n_" + kind] += sel.sum().item()
    # each rank divides by the global count / world size, and the averaged gradient is the global mean's
    loss = nll / (all_sum(torch.tensor(float(st["n_text"] + st["n_image"]), device=dev)) / world_size())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"warm-up loss is {loss.item()}; lower --warmup_lr (now {cfg.warmup_lr}) "
                                 "or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss, st, apply_gradients(opt, cfg.grad_clip, model)


def length_chunks(lengths, rows=8):
    """Indices into `lengths`, shortest first, in as many chunks as fixed chunks of `rows` would make (so as many
    forwards), cut where the fewest tokens are padding (a chunk pads to its longest row), and none holding more
    tokens than `rows` of the longest (the memory of a fixed chunk; README, "Speed")."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, L = len(order), [lengths[i] for i in order]
    k, cap = -(-n // rows), rows * max(L, default=0)
    # best[c][j]: the fewest padded tokens for the first j rows in c chunks; cut[c][j]: where the last one starts
    best = [[0.0] + [math.inf] * n] + [[math.inf] * (n + 1) for _ in range(k)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    for c in range(1, k + 1):
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):  # the last chunk is rows i..j-1, padded to L[j - 1]
                if L[j - 1] * (j - i) > cap:
                    break
                padded = best[c - 1][i] + L[j - 1] * (j - i)
                if padded < best[c][j]:
                    best[c][j], cut[c][j] = padded, i
    c = min(range(1, k + 1), key=lambda c: best[c][n]) if n else 0
    chunks, j = [], n
    while c:
        chunks.append(order[cut[c][j]:j])
        j, c = cut[c][j], c - 1
    return chunks[::-1]


def warmup_lr_at(cfg, it):
    """The warm-up's schedule: linear rise over cfg.warmup_rise iterations, cosine decay to 0 at cfg.warmup_iters."""
    return cfg.warmup_lr * min(1.0, (it + 1) / cfg.warmup_rise) * 0.5 * (1 + math.cos(math.pi * it / cfg.warmup_iters))


def warmup_examples(cfg):
    """The warm-up mix: the records of --warmup_data (a bad line fails naming file and line) or the toy world's."""
    if not cfg.warmup_data:
        ratio = (cfg.interleaved_ratio, 1.0, 1.0)
        return data.warmup_mix(cfg.n_understanding, seed=cfg.seed, ratio=ratio, image_size=cfg.image_size,
                               stall=cfg.warmup_stall)
    try:
        return data.load_jsonl(cfg.warmup_data)
    except ValueError as err:
        fail(f"--warmup_data: {err}")


def warmup(cfg, log, mix=None):
    """Plain next-token NLL over text and image tokens alike (stage 1); `mix`: warmup_examples(cfg), if read."""
    dev, ckpt = resolve_device(cfg), os.path.join(cfg.out_dir, "warmup")
    done, state = stopped_run(cfg, "warmup", cfg.warmup_iters)
    if done:
        return
    torch.manual_seed(cfg.seed)
    # float32 master weights (bf16 autocast computes): a bf16 weight would swallow small updates
    if state:
        model = load_model(ckpt, dev, torch.float32, four_bit=cfg.qlora)
        print(f"warm-up: resuming from {ckpt} at iter {state['iter']}")
    elif cfg.model:
        model = load_model(cfg.model, dev, torch.float32, cfg.lora_rank, cfg.lora_alpha, cfg.qlora)
    else:
        tok, vq, _ = load_prepared(cfg)
        model = UnifiedModel(tiny_janus(tok, vq, cfg).to(dev), tok)
        if cfg.lora_rank:
            print("warm-up: the toy model trains from scratch, so all of it trains; --lora_rank applies from GRPO on")
    broadcast_from_master(model)
    model = for_training(model, cfg)
    if cfg.fsdp:
        model = shard(model)
    mix = mix or warmup_examples(cfg)
    answers = model.encode_answers([e.answer for e in mix])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.warmup_lr, weight_decay=0.0,
                            foreach=True)
    # the batch sampler and CFG's prompt dropout (its own stream: p = 0 draws none); a resume restores both
    rng, drop_rng = random.Random(cfg.seed), random.Random(cfg.seed + 2000)
    start = resume(opt, state, (rng, drop_rng), model)
    trim_metrics(cfg, "warmup", start)
    with frozen_gc():
        model.train()
        for it in progress("warm-up", start, cfg.warmup_iters):
            lr_it = warmup_lr_at(cfg, it)
            for g in opt.param_groups:
                g["lr"] = lr_it
            t0 = time.time()
            pick = rng.sample(range(len(mix)), min(cfg.warmup_batch_size, len(mix)))  # the global batch
            drop = [drop_rng.random() < cfg.cfg_dropout for _ in pick] if cfg.cfg_dropout > 0 else None
            pick, drop = pick[rank()::world_size()], drop and drop[rank()::world_size()]  # this rank's share
            loss, st, gn = warmup_step(model, opt, [mix[i] for i in pick], [answers[i] for i in pick], cfg, drop)
            if it % cfg.log_interval == 0 or it == cfg.warmup_iters - 1:
                row = dict(loss=loss.item(), loss_text=st["nll_text"] / max(st["n_text"], 1),
                           loss_image=st["nll_image"] / max(st["n_image"], 1), grad_norm=gn.item(), lr=lr_it,
                           sec=time.time() - t0)
                row = mean_over_ranks(row, dict(loss_text=st["n_text"], loss_image=st["n_image"]))
                log(dict(stage="warmup", iter=it, **row))
            if (it + 1) % cfg.ckpt_interval == 0 or it + 1 == cfg.warmup_iters:
                save_checkpoint(model, ckpt, trainer_state(opt, it + 1, cfg, (rng, drop_rng), model))
    model.eval()
    write_storyboard(model, cfg, "warmup", cfg.warmup_iters)


# -----------------------------------------------------------------------------
# Stage 2: GRPO


def build_scorers(cfg, tokenizer, dev):
    """The reward models: r_t's critic and r_v's visual scorer (toy ones trained in `prepare`)."""
    critic = rewards.ToyTextCritic(data.parse) if cfg.text_critic == "toy" else rewards.VLMCritic(cfg.text_critic, dev)
    name = cfg.visual_scorer
    if name in ("clip", "clip_weak"):
        scorer = rewards.load_clip(os.path.join(cfg.out_dir, "prepare", name), tokenizer)
    elif name.startswith("openclip:"):
        arch, _, pretrained = name[len("openclip:"):].partition("/")
        scorer = rewards.load_openclip_scorer(arch, pretrained, dev)
    elif name == "imagereward":
        scorer = rewards.ImageRewardScorer(dev)
    else:
        fail(f"unknown --visual_scorer {name!r}; use clip, clip_weak, openclip:ARCH/PRETRAINED or imagereward")
    return critic, scorer


def score_rollout(model, ro, examples, critic, scorer, cfg):
    """Decode, then the hybrid reward per trajectory and per segment ("step_tensor": step rewards laid out [B, S])."""
    decoded = decode_rollout(model, ro)
    out = rewards.hybrid_reward([s for s, _ in decoded], ro.finished.tolist(), [e.ref_texts for e in examples],
                                [e.n_steps for e in examples], critic, scorer, use_format=cfg.use_format_reward,
                                use_text=cfg.use_text_reward, use_visual=cfg.use_visual_reward,
                                batch_tasks=[e.task for e in examples])
    step_r = torch.full((len(decoded), int(ro.segment.max()) + 1), float("nan"))
    for b, ((segs, index), row) in enumerate(zip(decoded, out["steps"])):
        for (kind, _), s, r in zip(segs, index, row):
            # a segment's reward counts only if its term is on (the process reward follows the ablation)
            if r is not None and (cfg.use_text_reward if kind == "text" else cfg.use_visual_reward):
                step_r[b, s] = r
    out["step_tensor"], out["decoded"] = step_r, decoded
    return out


def rl_prompts(cfg):
    """GRPO prompts: --rl_data, or the toy task families of rl_tasks from the RL split (never seen in warm-up)."""
    if cfg.rl_data:
        return data.load_prompts(cfg.rl_data)
    return [e for task in cfg.rl_tasks.split(",")
            for e in data.make_examples(task, 400, "rl", seed=cfg.seed, image_size=cfg.image_size)]


def grpo(cfg, log):
    """Stage 2: GRPO from the warm-up model, which stays frozen as the KL reference."""
    dev, ckpt, init = resolve_device(cfg), os.path.join(cfg.out_dir, "grpo"), os.path.join(cfg.out_dir, "warmup")
    done, state = stopped_run(cfg, "grpo", cfg.grpo_iters)
    if done:
        return
    torch.manual_seed(cfg.seed)
    # float32 master weights under bf16 autocast; with LoRA only the adapters train, so the base may be in --dtype
    pdtype = getattr(torch, cfg.dtype) if cfg.lora_rank else torch.float32
    if state:
        policy = load_model(ckpt, dev, pdtype, four_bit=cfg.qlora)
    else:
        policy = load_model(init, dev, pdtype, cfg.lora_rank, cfg.lora_alpha, cfg.qlora)
    policy = for_training(policy, cfg)
    if cfg.fsdp:
        policy = shard(policy)
    lora = getattr(policy, "lora", None) is not None
    if state and lora != (cfg.lora_rank > 0):
        fail(f"{ckpt} was trained {'with' if lora else 'without'} LoRA; resume with the same --lora_rank or use a "
             "new --out_dir")
    # the reference: with LoRA the policy's own base (adapters off), else a copy with the policy's dtypes (float32
    # weights under autocast: a bf16 copy would make KL > 0 at iteration 0); none if kl_beta = 0
    ref = None if cfg.kl_beta <= 0 else policy if lora else load_model(init, dev, pdtype, 0).requires_grad_(False)
    if cfg.fsdp and ref is not None:
        ref = shard(ref, reshard_root=True)
    critic, scorer = build_scorers(cfg, policy.tokenizer, dev)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0,
                            foreach=True)
    prompts_pool, rng = rl_prompts(cfg), random.Random(cfg.seed + 1000)  # the prompt sampler, saved in checkpoints
    start = resume(opt, state, (rng,), policy)
    for g in opt.param_groups:  # --lr wins over the lr saved with AdamW's state (check_resume said so if it changed)
        g["lr"] = cfg.lr
    if state:
        print(f"grpo: resuming from {ckpt} at iter {start}")
    trim_metrics(cfg, "grpo", start)
    score_fn = lambda ro, group: score_rollout(policy, ro, group, critic, scorer, cfg)
    k = cfg.prompts_per_step // world_size()
    mine = range(rank() * k, (rank() + 1) * k)  # this rank's prompts of the global batch
    held_out = lambda it: log_evaluation(policy, critic, scorer, cfg, log, it)
    with frozen_gc():
        for it in progress("grpo", start, cfg.grpo_iters):
            if cfg.eval_interval and it % cfg.eval_interval == 0:
                held_out(it)  # iteration 0: the warm-up model, the "before" of the table at the end
            examples = rng.sample(prompts_pool, cfg.prompts_per_step)  # the global batch: the same draw on every rank
            # rollout noise is a function of (seed, iter, prompt), not of the rank layout: N processes sample what
            # one does
            gens = [torch.Generator(dev).manual_seed(((cfg.seed * 1_000_003 + it) * 1_000_003 + p) % 2**63)
                    for p in mine]
            metrics = grpo_step(policy, ref, opt, [examples[p] for p in mine], score_fn, cfg, gens)
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"GRPO loss is {metrics['loss']} at iter {it}; lower --lr (now {cfg.lr}) or "
                                         "check the rewards")
            if it % cfg.log_interval == 0 or it + 1 == cfg.grpo_iters:
                log({"stage": "grpo", "iter": it, **metrics})
            if (it + 1) % cfg.ckpt_interval == 0 or it + 1 == cfg.grpo_iters:
                save_checkpoint(policy, ckpt, trainer_state(opt, it + 1, cfg, (rng,), policy))
            if (it + 1) % cfg.storyboard_interval == 0 or it + 1 == cfg.grpo_iters:
                write_storyboard(policy, cfg, "grpo", it + 1)
            release_memory()  # each iteration's rollouts differ in shape: the freed heap fragments and RSS creeps up
    if cfg.eval_interval and start < cfg.grpo_iters:
        evaluate_warmup = lambda: log_evaluation(load_model(init, dev).eval(), critic, scorer, cfg, log, 0)
        print_before_after(cfg, held_out(cfg.grpo_iters), evaluate_warmup)


def grpo_step(policy, ref, opt, examples, score_fn, cfg, generator=None):
    """One GRPO iteration, the paper's phases in order. score_fn(rollout, examples) -> dict with "reward" [B] and
    "step_tensor" [B, S]. Under DDP `examples` are this rank's prompts (whole groups: advantages need no
    communication); gradients and metrics are averaged over ranks, so they equal one process on the global batch."""
    dev, G, lap = policy.device, cfg.group_size, stopwatch()
    group = [e for e in examples for _ in range(G)]  # a group = G rollouts of one prompt, adjacent rows
    policy.eval()
    with autocast(cfg, dev):  # 1. sample G trajectories per prompt
        ro = sample_interleaved(policy, [e.prompt for e in group], cfg.temperature, cfg.max_new_tokens,
                                cfg.max_text_tokens, cfg.max_images, generator, cfg.cfg_scale)
    lap("sampling")
    sc = score_fn(ro, group)  # 2. score: the hybrid reward per trajectory and per segment
    R = sc["reward"].float()
    adv = group_advantages(R, G, scale=cfg.scale_rewards)[:, None].expand_as(ro.logp).clone()  # 3. advantages
    if cfg.process_reward:
        adv = adv + process_advantages(sc["step_tensor"], ro.segment.cpu(), G, scale=cfg.scale_rewards)
    adv = adv.to(dev)
    lap("scoring")
    share = shared_prompts(cfg)
    parts = micro_batches(ro, cfg.micro_batch, share)
    with autocast(cfg, dev):  # 4. the reference's log-probs, once per batch
        ref_logp = [reference_logprobs(ref, sub, cfg, share) for _, sub in parts] if ref is not None else None
    # 'token' loss: ranks hold different token counts, so each divides by the global count / world size and the
    # rank-averaged gradient is the global token mean's ('sequence': equal rows per rank suffice)
    n_tokens = all_sum(ro.mask.sum().to(dev)) / world_size()
    lap("reference")
    policy.train()
    update = policy_update(policy, opt, parts, adv, ref_logp, n_tokens, len(group), cfg)  # 5. the clipped objective
    policy.eval()
    return iteration_metrics(ro, sc, G, update, lap("update"))


def stopwatch():
    """lap(name): the seconds since the previous lap (or since the stopwatch was made), kept as time/name."""
    laps, last = {}, [time.time()]

    def lap(name):
        now = time.time()
        laps[f"time/{name}"], last[0] = now - last[0], now
        return laps
    return lap


def micro_batches(ro, size, group_size=1):
    """(rows, sub-rollout) parts of at most `size` rows of similar cost, in whole groups of group_size (a group's
    prompt runs once), each cut to its own length: the update's memory is that of `size` rollouts and little of it
    is padding (the loss is a sum over rows: order is free). Groups are sorted by their cost, the prompt once and
    the longest answer G times (README, "Speed")."""
    if len(ro.ids) <= size:
        return [(slice(None), ro)]
    G = group_size
    cost = ro.prompt_mask.sum(1)[::G] + G * ro.mask.sum(1).view(-1, G).amax(1)  # per group
    by_cost = (cost.argsort(stable=True)[:, None] * G + torch.arange(G)).flatten()
    return [(rows, trajectory_rows(ro, rows)) for rows in by_cost.split(max(1, size // G) * G)]


def shared_prompts(cfg):
    """The teacher-forced passes' group size (grouped_states), 1 under gradient checkpointing: transformers then
    drops the cache that carries a prompt's keys and values to its answers."""
    return 1 if cfg.grad_checkpointing else cfg.group_size


def policy_update(policy, opt, parts, adv, ref_logp, n_tokens, B, cfg):
    """cfg.inner_epochs passes of grpo_loss over the micro-batches (gradients accumulate over a pass), one AdamW step
    each. Returns the KL and entropy of the first pass (the policy that sampled: the ratio is exactly 1 there) and
    the last pass's loss, clip ratio and gradient norm; NaN where a non-finite loss stopped it before a step."""
    dev, nan, share = policy.device, float("nan"), shared_prompts(cfg)
    first, gn, old_logp = dict(entropy=nan, kl=nan), torch.tensor(nan), [None] * len(parts)
    for epoch in range(cfg.inner_epochs):
        opt.zero_grad(set_to_none=True)
        loss, st, ent_sum, n_sum = 0.0, dict(kl=0.0, clip_ratio=0.0), 0.0, 0.0
        for k, (rows, sub) in enumerate(parts):
            mask, T = sub.mask.to(dev), sub.ids.shape[1]
            with autocast(cfg, dev):
                logp, ent = sequence_logprobs(policy, sub, cfg.temperature, epoch == 0, cfg.cfg_scale, share)
            if epoch == 0:  # pi_old: this forward of the policy that sampled, not the KV-cache decode's (bf16 differs)
                old_logp[k] = logp.detach()
            part_loss, part_st = grpo_loss(logp, old_logp[k], ref_logp[k] if ref_logp else None, adv[rows, :T], mask,
                                           cfg.clip_eps, cfg.kl_beta, cfg.loss_type, n_tokens)
            if cfg.loss_type == "sequence":  # the mean over rows, in parts: each part by its share of the rows
                part_loss = part_loss * len(sub.ids) / B
            part_loss.backward()
            n = mask.sum().item()
            loss, n_sum = loss + part_loss.detach(), n_sum + n
            st = {key: st[key] + part_st[key] * n for key in st}
            ent_sum += (ent * mask).sum().item() if epoch == 0 else 0.0
        st = {key: v / max(n_sum, 1) for key, v in st.items()}  # per-token means over the parts
        if all_sum(torch.isfinite(loss).float()) < world_size():  # every rank stops together
            break
        gn = apply_gradients(opt, cfg.grad_clip, policy)
        if epoch == 0:
            first = dict(entropy=ent_sum / max(n_sum, 1), kl=st["kl"])
    return dict(kl=first["kl"], clip_ratio=st["clip_ratio"], entropy=first["entropy"], loss=loss.item(),
                grad_norm=gn.item())


def iteration_metrics(ro, sc, G, update, times):
    """A GRPO iteration's metrics row, averaged over ranks: per-token means weigh by the rank's tokens; the rest are
    means over equal rows or groups."""
    R, m = sc["reward"].float(), ro.mask.bool()
    r = R.view(-1, G)
    metrics = {"reward": R.mean().item(), "reward_std": r.std(1).mean().item(),
               **{f"rewards/{k}/mean": sc[k].float().mean().item() for k in ("format", "text", "visual") if k in sc},
               **update, "frac_reward_zero_std": (r.std(1) < 1e-6).float().mean().item(),
               "completions/mean_text_tokens": (m & ~ro.is_image).sum(1).float().mean().item(),
               "completions/mean_image_tokens": (m & ro.is_image).sum(1).float().mean().item(), **times}
    n = m.sum().item()
    return mean_over_ranks(metrics, {"kl": n, "clip_ratio": n, "entropy": n})


EVAL_METRICS = ("oracle_step", "oracle_text", "oracle_image", "format", "reward", "text", "visual", "images",
                "understanding_acc", "t2i_acc")  # what evaluate() reports (each family's oracle_step too)
HEADLINE_METRICS = ("oracle_step", "oracle_text", "oracle_image", "format", "reward", "understanding_acc", "t2i_acc")


@torch.no_grad()
def evaluate(model, critic, scorer, cfg, n, seed=0):
    """The held-out benchmark: one sample per eval-split prompt (n // 3 per interleaved family, n understanding, n
    text-to-image; the prompts follow cfg.seed), scored by the oracle (no reward model: the honest number) and by
    the hybrid reward. Every prompt draws its own noise from (seed, its index), so two checkpoints evaluated with
    one seed are compared on common random numbers."""
    make = lambda task, k: data.make_examples(task, k, "eval", seed=cfg.seed, image_size=cfg.image_size)
    if cfg.eval_data:  # real prompts: rewards only (the oracle knows the toy world alone)
        examples = data.load_prompts(cfg.eval_data)[:n]
    else:
        interleaved = [e for t in data.INTERLEAVED for e in make(t, max(1, n // 3))]
        examples = interleaved + make("understanding", n) + make("t2i", n)
    rows = []
    for i in range(0, len(examples), 96):  # batches of a task family (at n = 96): fewer decode steps in all
        ex = examples[i:i + 96]
        gens = [torch.Generator(model.device).manual_seed(seed * 1_000_003 + i + j) for j in range(len(ex))]
        ro = sample_interleaved(model, [e.prompt for e in ex], cfg.temperature, cfg.max_new_tokens, cfg.max_text_tokens,
                                cfg.max_images, gens, cfg.cfg_scale)
        sc = score_rollout(model, ro, ex, critic, scorer, cfg)
        for j, e in enumerate(ex):
            segs = sc["decoded"][j][0]
            first = lambda kind: next((x for k, x in segs if k == kind), None)  # the answer's first text / image
            if e.task == "understanding":
                rows.append(dict(task=e.task, understanding_acc=float(data.parse(first("text") or "") == e.states[0])))
            elif e.task == "t2i":
                drawn = first("image") is not None and data.parse_image(first("image")) == e.states[0]
                rows.append(dict(task=e.task, t2i_acc=float(drawn)))
            else:
                o = data.oracle_step_scores(segs, e.states)  # per step (text, image, both right); [] for a real prompt
                names = ("oracle_text", "oracle_image", "oracle_step")
                oracle = {k: sum(x[c] for x in o) / len(o) for c, k in enumerate(names)} if o else {}
                rows.append(dict(task=e.task, **oracle, format=float(sc["format"][j]), text=float(sc["text"][j]),
                                 visual=float(sc["visual"][j]), reward=float(sc["reward"][j]),
                                 images=sum(k == "image" for k, _ in segs)))
    out = {**{k: [r[k] for r in rows if k in r] for k in EVAL_METRICS},
           **{f"oracle_step/{t}": [r["oracle_step"] for r in rows if r["task"] == t and "oracle_step" in r]
              for t in data.INTERLEAVED}}
    return {k: sum(v) / len(v) for k, v in out.items() if v}


def log_evaluation(model, critic, scorer, cfg, log, it):
    """evaluate() on run_eval_prompts held-out prompts, logged as eval/* at `it` (the master evaluates, the others
    wait; under FSDP every rank does, since gathering the weights is a collective). The noise seed is fixed, so
    every evaluation of a run sees the same prompts and noise."""
    res = None
    if rank() == 0 or is_sharded(model.parameters()):
        t0, was_training = time.time(), model.training
        res = evaluate(model.eval(), critic, scorer, cfg, cfg.run_eval_prompts, seed=cfg.seed)
        model.train(was_training)
        log({"stage": "grpo", "iter": it, **{f"eval/{k}": v for k, v in res.items()}, "time/eval": time.time() - t0})
    barrier()
    return res


def print_before_after(cfg, after, evaluate_warmup):
    """The warm-up (GRPO's iteration-0 evaluation, from metrics.jsonl) against the final policy, same prompts and
    noise."""
    if rank() > 0:
        return
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "metrics.jsonl"))]
    before = next((r for r in rows if r.get("stage") == "grpo" and r["iter"] == 0 and "eval/oracle_step" in r), None)
    before = {k[5:]: v for k, v in before.items() if k.startswith("eval/")} if before else evaluate_warmup()
    cols = [c for c in HEADLINE_METRICS if c in before and c in after]  # --eval_data prompts have no oracle
    print(f"\nheld-out prompts ({cfg.run_eval_prompts} interleaved, {cfg.run_eval_prompts} understanding, "
          f"{cfg.run_eval_prompts} text-to-image; one sample each, temperature {cfg.temperature}):")
    print(f"{'':8}" + "".join(f"{c:>18}" for c in cols))
    for name, r in (("warm-up", before), ("GRPO", after), ("change", {c: after[c] - before[c] for c in cols})):
        print(f"{name:8}" + "".join(f"{r[c]:>+18.3f}" if name == "change" else f"{r[c]:>18.3f}" for c in cols))
    print(f"full evaluation ({cfg.eval_prompts} prompts per group): python eval.py --out_dir {cfg.out_dir}")


# -----------------------------------------------------------------------------
# Command line: nanoGPT-style --key value / --key=value, every value checked before any stage runs


def get_config(argv):
    """The config of a run: the defaults, then the preset's values, then the flags, type-checked and validated."""
    seen, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            fail(f"unexpected argument {arg!r}; use --key=value (keys: python unigrpo.py --help)")
        key, eq, val = arg[2:].partition("=")
        if key in ("help", "h"):
            print(__doc__ + "\nconfig keys and defaults:\n" + "\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items()))
            raise SystemExit(0)
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, DEFAULTS, n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            fail(f"unknown config key --{key}{hint}")
        if not eq:
            if isinstance(DEFAULTS[key], bool) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                val = "True"  # a bare boolean flag: --dry_run
            elif i + 1 < len(argv):
                i, val = i + 1, argv[i + 1]
            else:
                fail(f"--{key} needs a value")
        seen[key] = _coerce(key, val)
        i += 1
    name = seen.get("preset", DEFAULTS["preset"])
    if name not in ("", *PRESETS):
        fail(f"--preset={name!r} is unknown; choose one of {', '.join(PRESETS)}, or leave it out for the toy world")
    cfg = {**DEFAULTS, **PRESETS.get(name, {}), **seen}  # explicit flags win over the preset
    validate(cfg)
    return SimpleNamespace(**cfg)


def use_cpu_threads(cfg):
    """--cpu_threads on CPU (0 leaves torch's default, one per core); eval.py applies it too."""
    if resolve_device(cfg) == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)


def fail(msg):
    """A usage error: the message on stderr, exit status 2, no traceback (str() of it is the message, for tests)."""
    print(f"error: {msg}", file=sys.stderr)
    e = SystemExit(f"error: {msg}")
    e.code = 2
    raise e


def _coerce(key, val):
    want = type(DEFAULTS[key])
    if want is str:
        return val
    if want is bool:
        flag = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
        if val.lower() not in flag:
            fail(f"--{key} expects a boolean (true/false), got {val!r}")
        return flag[val.lower()]
    try:
        parsed = literal_eval(val)
    except (ValueError, SyntaxError):
        parsed = None
    if want is float and type(parsed) is int:
        parsed = float(parsed)
    if type(parsed) is not want:
        fail(f"--{key} expects {want.__name__} (default {DEFAULTS[key]!r}), got {val!r}")
    return parsed


_GE0, _GE1, _POS = (lambda v: v >= 0, "at least 0"), (lambda v: v >= 1, "at least 1"), (lambda v: v > 0, "> 0")
RANGES = dict(  # every numeric key: a bad value fails here, not minutes later as a NaN or a crash
    seed=_GE0, log_interval=_GE1, ckpt_interval=_GE1, storyboard_interval=_GE1, n_layer=_GE1, n_embd=_GE1,
    n_head=_GE1, image_size=_GE1, patch_size=_GE1, codebook_size=(lambda v: v >= 2, "at least 2"), lora_rank=_GE0,
    lora_alpha=_POS, vq_steps=_GE1, clip_steps=_GE1, warmup_iters=_GE1, warmup_batch_size=_GE1, warmup_lr=_POS,
    n_understanding=_GE1, interleaved_ratio=_GE0, temperature=_POS, cfg_scale=_GE0, max_new_tokens=_GE1,
    max_text_tokens=_GE1, max_images=_GE0, grpo_iters=_GE1, prompts_per_step=_GE1,
    group_size=(lambda v: v >= 2, "at least 2 (advantages are relative to the group)"), lr=_POS, inner_epochs=_GE1,
    micro_batch=_GE1, clip_eps=_POS, kl_beta=(lambda v: v >= 0, "at least 0 (0 = no KL term)"), grad_clip=_POS,
    eval_prompts=_GE1, eval_interval=(lambda v: v >= 0, "at least 0 (0 = no held-out evaluation during GRPO)"),
    run_eval_prompts=_GE1, warmup_rise=_GE0, cfg_dropout=(lambda v: 0 <= v < 1, "in [0, 1)"),
    warmup_stall=(lambda v: 0 <= v < 0.5, "in [0, 0.5): at 0.5 or more a stalled step is what the demos show most"),
    cpu_threads=(lambda v: v >= 0, "at least 0 (0 = torch's default)"))
CHOICES = dict(stage=("prepare", "warmup", "grpo"), loss_type=("sequence", "token"), dtype=("float32", "bfloat16"),
               scale_rewards=("group", "batch"))


def validate(cfg):
    """Every config value checked when the command line is parsed, before any stage runs."""
    bad = lambda k, need: fail(f"--{k}={cfg[k]!r} is invalid: {need}")
    if cfg["stage"] == "eval":
        bad("stage", f"evaluation is its own command: python eval.py --out_dir {cfg['out_dir']} "
                     "(it takes the same flags)")
    for k, choices in CHOICES.items():
        if cfg[k] not in choices:
            bad(k, f"choose one of {', '.join(choices)} (default {DEFAULTS[k]!r})")
    for k, (ok, need) in RANGES.items():
        if isinstance(cfg[k], float) and not math.isfinite(cfg[k]):
            bad(k, f"must be a finite number (default {DEFAULTS[k]!r})")
        if not ok(cfg[k]):
            bad(k, f"must be {need} (default {DEFAULTS[k]!r})")
    if cfg["n_embd"] % cfg["n_head"]:
        bad("n_embd", f"must be a multiple of --n_head={cfg['n_head']} (e.g. {cfg['n_head'] * 32})")
    p = cfg["patch_size"]
    if not cfg["model"] and (p & (p - 1) or cfg["image_size"] % p):  # the toy VQ halves the resolution per level
        bad("patch_size", f"must be a power of 2 dividing --image_size={cfg['image_size']} "
                          f"(default {DEFAULTS['patch_size']})")
    dev = cfg["device"]
    if dev not in ("auto", "cpu", "mps") and not (dev == "cuda" or dev.startswith("cuda:") and dev[5:].isdigit()):
        bad("device", "choose auto, cpu, cuda, cuda:N or mps")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        bad("device", "no CUDA device is visible here; use --device=cpu or --device=auto")
    if cfg["qlora"] and not cfg["lora_rank"]:
        bad("qlora", "QLoRA trains LoRA adapters over a 4-bit base: pass --lora_rank too")
    if cfg["qlora"] and (dev in ("cpu", "mps") or not torch.cuda.is_available()
                         or importlib.util.find_spec("bitsandbytes") is None):
        bad("qlora", "4-bit loading needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)")
    v = cfg["visual_scorer"]
    if v not in ("clip", "clip_weak", "imagereward") and not (v.startswith("openclip:") and v[9:].strip("/")):
        bad("visual_scorer", "choose clip, clip_weak, openclip:ARCH/PRETRAINED (e.g. openclip:ViT-L-14/openai) "
                             "or imagereward")
    if cfg["model"] and looks_local(cfg["model"]) and not is_checkpoint(os.path.expanduser(cfg["model"])):
        bad("model", f"no Janus checkpoint at {cfg['model']!r} (a folder with config.json from save_pretrained); "
                     "pass an existing folder, an HF id such as deepseek-community/Janus-Pro-1B, "
                     "or \"\" for the toy model")
    critic = cfg["text_critic"]
    if critic != "toy" and looks_local(critic) and not os.path.isdir(os.path.expanduser(critic)):
        bad("text_critic", "no such folder; pass toy, an HF id of a VLM critic or an existing folder")
    w = cfg["warmup_data"]
    if w and not (os.path.isfile(w) and os.access(w, os.R_OK)):
        bad("warmup_data", "no such readable file; pass a JSONL file (format: data.py) or \"\" for the toy world mix")
    if not cfg["rl_tasks"] or any(t not in data.TASKS for t in cfg["rl_tasks"].split(",")):
        bad("rl_tasks", f"must be a comma-separated subset of {','.join(data.TASKS)} "
                        f"(default {DEFAULTS['rl_tasks']!r})")
    if not cfg["out_dir"]:
        bad("out_dir", "pass the folder for checkpoints and metrics (default 'out')")
    there = os.path.abspath(cfg["out_dir"])
    while not os.path.exists(there):  # the nearest existing folder is where out_dir would be created
        there = os.path.dirname(there)
    try:  # a real write (os.access says yes to root everywhere); the probe file is gone at once
        tempfile.TemporaryFile(dir=there).close()
    except OSError as err:
        bad("out_dir", f"cannot write in {there} ({err.strerror}); pass a folder you can write to")


# -----------------------------------------------------------------------------
# main: the stages in order; a later stage on an empty out_dir runs the missing earlier ones first


def stage_complete(cfg, name):
    """Whether out_dir holds a complete `name` stage (the toy world's `prepare` is not needed with --model)."""
    if name == "prepare":
        return bool(cfg.model) or all(os.path.exists(os.path.join(cfg.out_dir, "prepare", p))
                                      for p in prepared_parts(cfg))  # a killed prepare resumes
    path = os.path.join(cfg.out_dir, name)
    state = load_state(path)
    iters = cfg.warmup_iters if name == "warmup" else cfg.grpo_iters
    return bool(state) and is_checkpoint(path) and state["iter"] >= iters


def check_data(cfg, todo):
    """A preset trains and evaluates on real data: each stage to run needs its file, checked before any work (GRPO
    and evaluation prompts line by line: a bad line should not surface after the warm-up)."""
    for name in todo:
        key = PRESET_DATA.get(name)
        if key is None or (name != cfg.stage and stage_complete(cfg, name)):
            continue
        path = getattr(cfg, key)
        if cfg.preset and not path:
            raise SystemExit(f"error: --preset {cfg.preset} runs the {name} stage on real data: pass --{key} FILE "
                             "(JSONL, format at the top of data.py; example files in tests/data/)")
        if path and not os.path.isfile(path):
            raise SystemExit(f"error: --{key} {path!r}: no such file")
        if path and key != "warmup_data":
            data.load_prompts(path, check_only=True)


@contextlib.contextmanager
def frozen_gc():
    """Around a stage's loop: what is alive at its start (modules, the models, the data) lives through it, and a full
    collection walks every live object, 0.27 s each with them. Frozen, they are skipped by the collector's passes,
    Python's own and ours between GRPO iterations."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_memory():
    """Between stages and GRPO iterations: glibc keeps freed heap mapped, so RSS would keep the high-water mark."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv=None):
    cfg = get_config(sys.argv[1:] if argv is None else argv)
    if cfg.dry_run:
        print(json.dumps(vars(cfg), indent=2))
        print(format_memory(memory_estimate(cfg)))
        return cfg
    ddp = ddp_init(cfg)
    # per-rank seeds, as nanoGPT; the model's initial weights and the rollouts do not depend on them
    torch.manual_seed(cfg.seed + rank())
    random.seed(cfg.seed + rank())
    use_cpu_threads(cfg)
    order = ["prepare", "warmup", "grpo"]
    todo = order[: order.index(cfg.stage) + 1]
    check_data(cfg, todo)
    if cfg.fsdp and (not ddp or cfg.lora_rank):
        fail("--fsdp shards a full fine-tune over torchrun's processes: launch with torchrun, "
             "without --lora_rank (LoRA's trainable part is small: plain DDP replicates it)")
    if cfg.fsdp and "warmup" in todo and cfg.warmup_batch_size % world_size():  # equal shares: the same collectives
        fail(f"--fsdp needs --warmup_batch_size={cfg.warmup_batch_size} divisible by the number of processes "
             f"({world_size()})")
    if "grpo" in todo and cfg.prompts_per_step % world_size():  # before any work
        fail(f"--prompts_per_step={cfg.prompts_per_step} must be divisible by the number of processes "
             f"({world_size()}): each rank samples whole groups; change it or --nproc_per_node")
    # real warm-up data is read before any stage runs: a bad line costs seconds, not a prepare stage
    mix = warmup_examples(cfg) if cfg.warmup_data and "warmup" in todo and not stage_complete(cfg, "warmup") else None
    log = make_logger(cfg)
    for name in todo:
        skip = name != cfg.stage and stage_complete(cfg, name)
        if name != cfg.stage and not skip:
            print(f"{cfg.stage}: no finished {name} stage in {cfg.out_dir}; running it first")
        barrier()  # every rank has looked at out_dir before the master writes to it
        if skip:
            continue
        if name == "prepare":
            if not cfg.model and rank() == 0:
                prepare(cfg)  # once, on the master; the other ranks wait, then load what it wrote
            barrier()
        elif name == "warmup":
            warmup(cfg, log, mix)
        else:
            grpo(cfg, log)
        if name != todo[-1]:
            release_memory()
    if ddp:
        torch.distributed.destroy_process_group()
    return cfg


if __name__ == "__main__":
    main()
    gc.freeze()  # at exit the interpreter's collections would walk every object (1.3 s with transformers loaded)
