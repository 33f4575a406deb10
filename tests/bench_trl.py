"""The TRL side of `python tests/bench.py --vs_trl`: steps of TRL's GRPOTrainer on a random-weight Llama, timed per
step. Run by a Python that has trl (not the project's venv: trl is no dependency); it imports nothing of the project.

    TRL_PYTHON tests/bench_trl.py --tokenizer DIR --prompts '["<bos> a b <sep>", ...]' --threads 1 --steps 3

Prints ONE JSON line on stdout: per-step seconds (on_step_begin -> on_step_end, after --warmup untimed steps), each
step's phase split (TRL's own methods, timed by wrapping them), and what ran (versions, sizes, lengths seen).
"""
import argparse
import collections
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder (save_pretrained)")
    ap.add_argument("--prompts", required=True, help="JSON list of prompt strings (each prompt's tokens, space-joined)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--group", type=int, default=4, help="G, completions per prompt")
    ap.add_argument("--new_tokens", type=int, default=40, help="exactly this many tokens per completion")
    ap.add_argument("--beta", type=float, default=0.04, help="k3 KL coefficient (> 0: a frozen reference model)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # renamed arguments, inside trl

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = json.loads(args.prompts)
    prompt_lens = sorted({len(tok(p).input_ids) for p in prompts})
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=len(tok),
                         max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    work = tempfile.mkdtemp(prefix="unigrpo_bench_trl_")
    try:
        # GRPOTrainer loads its reference model from the policy's path, so the policy goes through the disk
        model_dir = os.path.join(work, "model")
        LlamaForCausalLM(config).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)

        def even_fraction(completion_ids, **_):  # cheap, a function of token ids only; the project's side is the same
            return [sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)) for ids in completion_ids]

        phases, lengths = collections.Counter(), set()

        class Timed(GRPOTrainer):
            """GRPOTrainer with its phases timed: the methods it calls once per step, wrapped."""

            def _timed(self, name, f, *a, **kw):
                t = time.perf_counter()
                try:
                    return f(*a, **kw)
                finally:
                    phases[name] += time.perf_counter() - t

            def _prepare_inputs(self, *a, **kw):  # generation, rewards, reference, advantages (training_step's first part)
                return self._timed("prepare_inputs", super()._prepare_inputs, *a, **kw)

            def _generate_single_turn(self, *a, **kw):  # model.generate
                completion_ids, logprobs = self._timed("sampling", super()._generate_single_turn, *a, **kw)
                lengths.update(len(c) for c in completion_ids)
                return completion_ids, logprobs

            def _calculate_rewards(self, *a, **kw):
                return self._timed("scoring", super()._calculate_rewards, *a, **kw)

            def _get_per_token_logps_and_entropies(self, *a, **kw):
                # without a graph only for the reference (num_iterations=1: no old-log-prob pass); with one in the loss
                name = "reference" if not torch.is_grad_enabled() else "policy_logps"
                return self._timed(name, super()._get_per_token_logps_and_entropies, *a, **kw)

        steps, splits, threads_seen = [], [], set()

        class StepTimer(TrainerCallback):
            def on_step_begin(self, targs, state, control, **kw):
                phases.clear()
                threads_seen.add(torch.get_num_threads())
                self.t = time.perf_counter()

            def on_step_end(self, targs, state, control, **kw):
                dt = time.perf_counter() - self.t
                if state.global_step > args.warmup:
                    p = dict(phases)
                    other = p.get("prepare_inputs", 0.0) - sum(p.get(k, 0.0) for k in ("sampling", "scoring", "reference"))
                    steps.append(dt)
                    splits.append(dict(sampling=p.get("sampling", 0.0), scoring=p.get("scoring", 0.0),
                                       reference=p.get("reference", 0.0), update=dt - p.get("prepare_inputs", 0.0),
                                       other=other))

        B = len(prompts) * args.group
        cfg = GRPOConfig(
            output_dir=os.path.join(work, "out"), report_to=[], use_cpu=True, seed=args.seed,
            max_steps=args.warmup + args.steps, per_device_train_batch_size=B, gradient_accumulation_steps=1,
            num_generations=args.group, num_iterations=1, max_completion_length=args.new_tokens,
            generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_k=0, top_p=1.0,
            beta=args.beta, loss_type="grpo", epsilon=0.2, scale_rewards="group", max_grad_norm=1.0,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
            # TRL's defaults that the project's step does not do: bf16 autocast, gradient checkpointing
            bf16=False, fp16=False, activation_checkpointing=False, gradient_checkpointing=False,
            logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True, log_completions=False,
            dataloader_num_workers=0)
        trainer = Timed(model=model_dir, reward_funcs=even_fraction, args=cfg,
                        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                        callbacks=[StepTimer()])
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
            trainer.train()
        m = trainer.model
        out = dict(
            steps=steps, splits=splits, threads=sorted(threads_seen), batch=B, prompt_lens=prompt_lens,
            completion_lens=sorted(lengths), bf16=cfg.bf16,
            checkpointing=getattr(m, "is_activation_checkpointing", None),
            params_trunk_head=sum(p.numel() for p in m.parameters()),
            params_embedding=m.get_input_embeddings().weight.numel(), ref_model=trainer.ref_model is not None,
            attn_implementation=m.config._attn_implementation, optimizer=type(trainer.optimizer.optimizer
                                                                             if hasattr(trainer.optimizer, "optimizer")
                                                                             else trainer.optimizer).__name__,
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024),
            versions=dict(trl=trl.__version__, transformers=transformers.__version__, torch=torch.__version__,
                          accelerate=__import__("accelerate").__version__, datasets=datasets.__version__,
                          python=sys.version.split()[0]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
