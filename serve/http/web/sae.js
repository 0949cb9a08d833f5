// #/ (the loaded SAEs) and #/sae/ID (an SAE's training card, plots, density histogram, feature browser).

import * as api from "./api.js";
import { densityHistogram, histogramChart } from "./charts.js";
import { fmt, h, percent, statusLine, tokenLabel, withStatus } from "./dom.js";

/** The density histogram of all features: the trainer's, else built from the feature summaries; null without stats. */
export async function saeHistogram(card) {
  if (card.card && card.card.density_histogram) return card.card.density_histogram;
  if (!card.has_feature_stats) return null;
  const all = await api.featureList(card.id, "", card.d_sae);
  return densityHistogram(all.data.map((f) => f.density));
}

export async function homeView(main) {
  const status = statusLine();
  main.replaceChildren(h("h1", {}, "Loaded SAEs"), status.el);
  const loaded = await withStatus(status, "SAEs", api.saes);
  if (!loaded) return;
  main.append(
    loaded.data.length
      ? h("ul", { class: "sae-list" }, loaded.data.map((s) => h("li", {},
        h("a", { href: `#/sae/${encodeURIComponent(s.id)}` }, s.id),
        ` ${s.architecture}, ${s.d_sae} features at ${s.hook_point}`)))
      : h("p", {}, "No SAE is loaded."),
    h("p", {}, h("a", { href: "#/playground" }, "Steering playground"), " · ",
      h("a", { href: "#/activations" }, "Activations")),
  );
}

function cardTable(card) {
  const evaluation = (card.card && card.card.evaluation) || {};
  const rows = [
    ["Hook point", card.hook_point],
    ["Architecture", card.k ? `${card.architecture} (k = ${card.k})` : card.architecture],
    ["Features × width", `${card.d_sae} × ${card.d_in}`],
    ["Model", card.model || "—"],
    ["FVU (held out)", fmt(evaluation.fvu)],
    ["L0", fmt(evaluation.l0, 2)],
    ["Dead features", percent(evaluation.dead_frac)],
    ["Loss recovered", percent(evaluation.loss_recovered)],
  ];
  return h("table", { class: "card" },
    h("caption", {}, card.card ? "Training card" : "No training card: only the SAE's config is known"),
    h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, v)))));
}

async function plots(card) {
  const names = ((card.card && card.card.files) || {}).plots || [];
  if (!names.length) return [h("p", { class: "hint" }, "No training plots recorded for this SAE.")];
  return Promise.all(names.map(async (name) => {
    try {
      return h("figure", { class: "plot" }, h("img", { src: await api.plotUrl(card.id, name), alt: `${name} of ${card.id}` }),
        h("figcaption", {}, name));
    } catch (err) {
      return h("p", { class: "status error", role: "alert" }, `Error: ${err.message}`);
    }
  }));
}

function featureBrowser(sae) {
  const query = h("input", { id: "sae-query", type: "search", placeholder: "index, token or explanation" });
  const results = h("ul", { class: "results", "aria-label": "Matching features" });
  const status = statusLine();
  const search = async (e) => {
    e.preventDefault();
    const found = await withStatus(status, "features", () => api.featureList(sae, query.value, 50));
    if (!found) return;
    status.el.textContent = `${found.total} matching features${found.total > found.data.length ? ` (first ${found.data.length})` : ""}.`;
    results.replaceChildren(...found.data.map((f) => h("li", {},
      h("a", { href: `#/sae/${encodeURIComponent(sae)}/feature/${f.id}` }, `#${f.id}`),
      ` ${f.explanation || ""} ${f.activating_tokens.map(tokenLabel).join(" ")} · density ${fmt(f.density)}`)));
  };
  return h("section", {}, h("h2", {}, "Features"),
    h("form", { class: "row", role: "search", onsubmit: search },
      h("label", { for: "sae-query" }, "Find a feature"), query, h("button", { type: "submit" }, "Search")),
    status.el, results);
}

export async function saeView(main, sae) {
  const status = statusLine();
  main.replaceChildren(h("h1", {}, `SAE ${sae}`), status.el);
  const card = await withStatus(status, "the SAE card", () => api.saeCard(sae));
  if (!card) return;
  const histogram = await withStatus(status, "feature densities", () => saeHistogram(card));
  main.append(
    h("p", {}, h("a", { href: `#/playground?sae=${encodeURIComponent(sae)}` }, "Steer with this SAE"), " · ",
      h("a", { href: `#/activations?sae=${encodeURIComponent(sae)}` }, "Read activations")),
    cardTable(card),
    h("h2", {}, "Training curves"),
    ...(await plots(card)),
    h("h2", {}, "Feature density"),
    histogram ? histogramChart(histogram) : h("p", { class: "hint" }, "No feature statistics for this SAE."),
    featureBrowser(sae),
  );
}
