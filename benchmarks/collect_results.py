"""Print a markdown table from results.json files: python benchmarks/collect_results.py RUN/*/results.json"""
import argparse
import json


def fmt(metric, v):
    return f"{100 * v:.2f}" if metric == "accuracy" else f"{v:.3f}"


def main(paths):
    print("| run | algorithm | setting | test steps | metric | mean +- 95% CI | episodes | iterations | train min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        r = json.load(open(p))
        m = r["metric"]
        setting = f"{r['ways']}-way {r['shots']}-shot" if r.get("ways") else f"K={r['shots']}"
        rows = [(r["inner_steps_test"], m["mean"], m["ci95"])]
        rows += [(int(s), v["mean"], v["ci95"]) for s, v in (r.get("by_inner_steps") or {}).items()]
        for steps, mean, ci in rows:
            print(f"| {p.split('/')[-2]} | {r['algorithm']} | {setting} | {steps} | {m['name']} | "
                  f"{fmt(m['name'], mean)} +- {fmt(m['name'], ci)} | {r['episodes']} | {r['iterations']} | "
                  f"{r['train_seconds'] / 60:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="+", help="results.json files, e.g. runs/omniglot/*/results.json")
    main(parser.parse_args().paths)
