"""lm-evaluation-harness over an in-memory model: the MC, GEN and AVG scores of one eval config.

    from ream_exp.evaluation.checks import check_tasks
    from ream_exp.evaluation.harness import evaluate
    check_tasks(cfg.eval)                            # before the model is loaded: bad names fail here
    metrics = evaluate(model, tokenizer, cfg.eval, output_dir=run_dir / "lm_eval")
    # {"tasks", "mc", "gen", "avg", "mc_stderr", "gen_stderr", "avg_stderr", "percent", "mc_tasks",
    #  "gen_tasks", "gen_protocol", "limit", "bootstrap_iters", "skipped", "versions"}

The eval config is one of conf/eval/*.yaml. Every name in its `tasks` list is scored as ONE task:
a leaf task by its own metric, a group (mmlu) by the group's aggregate score, a tag by each of the
tasks it stands for. MC = mean of the MC task scores, GEN = mean of the GEN ones, AVG = (MC + GEN) / 2
(docs/evaluation.md).

The modules, in the order a run uses them:

    eval_config   reading an eval config: its task names, include_path, bootstrap_iters, per-kind settings
    task_index    lm-eval's task index (one per include_path, ream_exp/code_tasks always on it): names to
                  leaf tasks, the versions the task YAMLs declare
    checks        every check of an eval config before any model work (tasks, backend, settings)
    data_needs    what the tasks read besides the model: hub datasets, nltk data
    code_policy   code-executing tasks run only with allow_code_eval, and only through ream_exp.sandbox
    entries       requested names -> lm-eval Task/Group objects, MC or GEN, and the metric each is scored by
    harness       the lm-eval call (hf or vLLM backend) and lm-eval's own results files; `evaluate`
    scores        per-task scores, standard errors and protocols, the suites' means; what made a set of
                  scores (EVAL_VERSION, `scores_made_by`)
"""
