"""mkdocs hook: the results pages, generated at build time from experiments/results/*.json.

One page per experiment (``results/<name>.md``, not in the repository): its title, a "Run" table
and, where the JSON has them, the headline and the key figures -- read from ``<name>.json`` when
the site is built -- then the report the same run wrote (``<name>.md``) and its plots
(``<name>_*.png``).  A headline or key figure of the JSON that the run's report does not contain
stops the build (the two files are from different runs).  ``results/index.md`` lists the pages.
"""
import json
import pathlib

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
TITLES = {          # name -> page title, in the order of the results index
    "worked_examples": "Worked examples of the notes",
    "graph": "Computational graphs: log(xy) and fan-out",
    "activations": "Activations",
    "optimizers": "Optimizers",
    "batch_size": "Batch size",
    "mnist_mlp": "MNIST MLP (784-512-512-10)",
    "sweep": "Learning-rate sweep",
    "cnn": "CNN (LeNet)",
    "dp_sgd": "DP-SGD",
    "feedback": "Feedback alignment and straight-through estimators",
    "bench": "Benchmark: the MLP training step",
    "bench_cnn": "Benchmark: the LeNet step",
    "bench_per_example": "Benchmark: per-example quantities",
    "bench_lstm": "Benchmark: the LSTM step",
    "bench_lstm_h384": "Benchmark: the LSTM step at H = 384 (the text defaults)",
    "char_rnn": "Character-level Shakespeare: Elman, GRU, LSTM",
    "text_run": "Shakespeare LSTM against PyTorch, seed 0",
    "text_run_seed1": "Shakespeare LSTM against PyTorch, seed 1",
    "text_run_seed2": "Shakespeare LSTM against PyTorch, seed 2",
    "text_run_seed1_torch_malloc_same": "Shakespeare LSTM against PyTorch, seed 1, the same malloc settings",
    "text_run_epochs40": "Shakespeare LSTM against PyTorch: 40 epochs, H = 256, no dropout",
}


def _key_figures(name, data):
    """(markdown lines, strings the run's report must contain) read from the JSON."""
    if name == "cnn":
        rows = ["| configuration | seeds | test accuracy per seed (%) | mean (%) |", "|---|---|---|---|"]
        must = []
        for config, r in data["results"].items():
            per_seed = " / ".join(f"{100 * a:.2f}" for a in r["accuracies"])
            rows.append(f"| {config} | {r['seeds']} | {per_seed} | {100 * r['mean']:.2f} |")
            must.append(per_seed)
        return rows, must
    if name == "worked_examples":
        return [f"**{data['n_ok']} of {data['n_rows']}** quantities agree."], []
    return [], []


def _page(name):
    data = json.loads((RESULTS / f"{name}.json").read_text())
    report = (RESULTS / f"{name}.md").read_text()
    meta = data.get("meta") or {}
    env = meta.get("environment", {})
    lines = [f"# {TITLES.get(name, name)}", ""]
    headline = data.get("headline")
    must = []
    if isinstance(headline, str):
        lines += [f"**{headline}**", ""]
        must.append(headline)
    figures, figure_strings = _key_figures(name, data)
    if figures:
        lines += ["## Key figures (from the run's JSON)", ""] + figures + [""]
        must += figure_strings
    missing = [m for m in must if m not in report]
    if missing:
        raise ValueError(f"docs/hooks/results.py: experiments/results/{name}.md does not contain {missing[:2]} of "
                         f"{name}.json: the report and the JSON are from different runs; rerun the experiment")
    run = [("command", f"`{meta['command']}`" if meta.get("command") else None),
           ("seconds", meta.get("seconds")), ("quick mode", meta.get("quick")),
           ("jax / backend", f"{env['jax']} / {env.get('backend')}" if env.get("jax") else None)]
    run = [(k, v) for k, v in run if v is not None]
    if run:
        lines += ["| run | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in run] + [""]
    body = report.split("\n", 1)[1] if report.startswith("# ") else report       # the page has its title
    lines += ["## The run's report", "", body.replace("\n# ", "\n## ")]
    shown = set()
    for png in sorted(RESULTS.glob(f"{name}_*.png")):
        if png.name not in report:
            lines += ["", f"![{png.stem}]({png.name})"]
        shown.add(png.name)
    return "\n".join(lines) + "\n", shown


def _names():
    present = {p.stem for p in RESULTS.glob("*.json") if (RESULTS / f"{p.stem}.md").exists()}
    return [n for n in TITLES if n in present] + sorted(present - set(TITLES))


def on_config(config):
    results_nav = [{"All results": "results/index.md"}] + [{TITLES.get(n, n): f"results/{n}.md"} for n in _names()]
    config["nav"] = [item for item in config["nav"] if "Results" not in item] + [{"Results": results_nav}]
    return config


def on_files(files, config):
    index = ["# Results", "", "Each page is generated when the site is built from the experiment's "
             "`experiments/results/<name>.json` and the report and plots the same run wrote.", "",
             "| experiment | headline |", "|---|---|"]
    for name in _names():
        text, pngs = _page(name)
        files.append(File.generated(config, f"results/{name}.md", content=text))
        for png in sorted(RESULTS.glob(f"{name}_*.png")):
            files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
        headline = json.loads((RESULTS / f"{name}.json").read_text()).get("headline")
        index.append(f"| [{TITLES.get(name, name)}]({name}.md) | {headline if isinstance(headline, str) else ''} |")
    files.append(File.generated(config, "results/index.md", content="\n".join(index) + "\n"))
    return files


CDN_MATHJAX = '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'


def on_post_build(config):
    """With FNBP_DOCS_MATHJAX set to a local MathJax 2 directory (Debian's libjs-mathjax:
    /usr/share/javascript/mathjax), the pages load it instead of the CDN's MathJax 3: an offline build
    (the screenshot test) then shows typeset math too."""
    import os
    local = os.environ.get("FNBP_DOCS_MATHJAX")
    if not local or not os.path.isfile(os.path.join(local, "MathJax.js")):
        return
    site = pathlib.Path(config["site_dir"])
    link = site / "javascripts" / "mathjax2"
    if not link.exists():
        link.symlink_to(pathlib.Path(local).resolve(), target_is_directory=True)
    for html in site.rglob("*.html"):
        text = html.read_text()
        if CDN_MATHJAX in text:
            rel = os.path.relpath(link / "MathJax.js", html.parent)
            html.write_text(text.replace(CDN_MATHJAX, f'<script src="{rel}?config=TeX-AMS-MML_HTMLorMML"></script>'))
