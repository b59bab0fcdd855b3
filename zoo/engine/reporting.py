"""Human-readable results: the recall table printed at the end of a test run."""
from __future__ import annotations


def format_recall_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """Markdown-style table, one row per evaluation protocol (e.g. 5K and the 1K fold mean)."""
    cols = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "mR", "i2t_medr", "t2i_medr"]
    heads = ["protocol", "I→T R@1", "R@5", "R@10", "T→I R@1", "R@5", "R@10", "rsum", "mR", "medr I→T", "medr T→I"]
    lines = []
    if title:
        lines.append(f"\n{title}")
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|" + "|".join("---" for _ in heads) + "|")
    for split, m in results.items():
        if split.startswith("beta"):  # CASC's beta sweep: beta<b> (all images) or beta<b>_<fold> (fold mean)
            b, _, fold = split[4:].partition("_")
            name = f"beta={b}, " + (f"{fold} (fold mean)" if fold else "all images")
        else:
            name = {"all": "all images"}.get(split, f"{split} (fold mean)")
        vals = [f"{m[c]:.1f}" for c in cols]
        lines.append("| " + " | ".join([name] + vals) + " |")
    return "\n".join(lines)
