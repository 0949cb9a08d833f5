// #/sae/ID/feature/N: logit lens, density against all features, top-activating contexts, "steer with this".

import * as api from "./api.js";
import { histogramChart } from "./charts.js";
import { fmt, h, statusLine, tokenLabel, withStatus } from "./dom.js";
import { saeHistogram } from "./sae.js";

function lensList(title, tokens) {
  return h("section", { class: "lens" }, h("h3", {}, title),
    h("ol", {}, tokens.map((t) => h("li", {}, h("code", {}, tokenLabel(t.token)), ` ${fmt(t.logit)}`))));
}

function context(ctx) {
  return h("li", { class: "context" },
    h("span", { class: "act" }, fmt(ctx.activation, 2)),
    h("span", { class: "ctx-tokens" }, ctx.tokens.map((tok, i) => i === ctx.index
      ? h("mark", { title: `activation ${fmt(ctx.activation)}` }, tokenLabel(tok))
      : h("span", {}, tokenLabel(tok)))));
}

export async function featureView(main, sae, index) {
  const status = statusLine();
  const base = `#/sae/${encodeURIComponent(sae)}`;
  main.replaceChildren(h("h1", {}, `${sae} · feature #${index}`), status.el);
  const loaded = await withStatus(status, "the feature", () => Promise.all([api.featureCard(sae, index), api.saeCard(sae)]));
  if (!loaded) return;
  const [feature, card] = loaded;
  const histogram = card.has_feature_stats ? await withStatus(status, "densities", () => saeHistogram(card)) : null;
  const steer = h("button", { type: "button", id: "steer-this",
    onclick: () => { location.hash = `#/playground?sae=${encodeURIComponent(sae)}&feature=${index}`; } },
  "Steer with this");
  const nav = h("nav", { class: "row", "aria-label": "Neighbouring features" },
    index > 0 ? h("a", { href: `${base}/feature/${index - 1}` }, `← #${index - 1}`) : null,
    index + 1 < card.d_sae ? h("a", { href: `${base}/feature/${index + 1}` }, `#${index + 1} →`) : null,
    h("a", { href: base }, `all of ${sae}`),
    h("a", { href: `#/activations?sae=${encodeURIComponent(sae)}&feature=${index}` }, "Read text with it"));
  const contexts = feature.top_contexts;
  main.append(...[
    feature.explanation ? h("p", { class: "explanation" }, feature.explanation) : null,
    h("div", { class: "row" }, steer), nav,
    h("table", { class: "card" }, h("tbody", {},
      [["Density", fmt(feature.density)], ["Mean activation (where active)", fmt(feature.mean_activation)],
       ["Max activation", fmt(feature.max_activation)], ["Decoder norm", fmt(feature.decoder_norm)]]
        .map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, v))))),
    h("h2", {}, "Logit lens"),
    h("div", { class: "columns" }, lensList("Promotes", feature.top_tokens), lensList("Suppresses", feature.bottom_tokens)),
    h("h2", {}, "Density among all features"),
    histogram ? histogramChart(histogram, feature.density, `Feature density of ${sae}`)
      : h("p", { class: "hint" }, "No feature statistics for this SAE."),
    h("h2", {}, "Top-activating contexts"),
    contexts && contexts.length
      ? h("ol", { class: "contexts", id: "top-contexts" }, contexts.map(context))
      : h("p", { class: "hint" }, "No recorded contexts."),
  ].filter(Boolean));
}
