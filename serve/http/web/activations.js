// #/activations: paste text, see its tokens shaded by one feature's activation; pick a token to list its top features.

import * as api from "./api.js";
import { fmt, h, saeSelect, statusLine, tokenLabel, withStatus } from "./dom.js";

const TOP_K = 10;

function shade(value, max) {
  const alpha = max > 0 ? Math.max(0, value) / max : 0;
  return { backgroundColor: `rgba(255, 120, 0, ${alpha.toFixed(3)})` };
}

function topFeatures(sae, token) {
  const values = token.saes && token.saes[sae];
  if (!values) return h("p", {}, `The model never read “${tokenLabel(token.text)}”, so it has no features.`);
  return h("div", {},
    h("h3", {}, `Top features of token ${token.index} “${tokenLabel(token.text)}”`),
    h("ol", { class: "top-features" }, values.top.map(([feature, value]) => h("li", {},
      h("a", { href: `#/sae/${encodeURIComponent(sae)}/feature/${feature}` }, `#${feature}`), ` ${fmt(value)}`))));
}

export async function activationsView(main, params) {
  const status = statusLine();
  main.replaceChildren(h("h1", {}, "Activations"), status.el);
  const loaded = await withStatus(status, "SAEs", api.saes);
  if (!loaded) return;
  const list = loaded.data;
  const chosen = list.some((s) => s.id === params.get("sae")) ? params.get("sae") : list[0] && list[0].id;
  const select = saeSelect(list, chosen, "act-sae");
  const feature = h("input", { id: "act-feature", type: "number", min: 0, step: 1,
    value: params.get("feature") || "" });
  const text = h("textarea", { id: "act-text", rows: 4, placeholder: "Paste text to read" });
  const runStatus = statusLine();
  const tokens = h("div", { class: "tokens", "aria-label": "Tokens", role: "group" });
  const detail = h("div", { class: "detail", "aria-live": "polite" });
  const legend = h("p", { class: "hint" });

  const analyse = async (e) => {
    e.preventDefault();
    if (!text.value) return;
    const sae = select.value;
    const chosenFeature = feature.value === "" ? null : Number(feature.value);
    const body = { input: text.value, saes: [sae], top_k: TOP_K };
    if (chosenFeature !== null) body.features = { [sae]: [chosenFeature] };
    const out = await withStatus(runStatus, "activations", () => api.activations(body));
    if (!out) return;
    // Shade by the chosen feature, or by each token's strongest feature when none is chosen.
    const value = (t) => {
      const v = t.saes && t.saes[sae];
      if (!v) return 0;
      if (chosenFeature !== null) return v.features.length ? v.features[0][1] : 0;
      return v.top.length ? v.top[0][1] : 0;
    };
    const max = Math.max(0, ...out.tokens.map(value));
    legend.textContent = chosenFeature !== null
      ? `Shaded by feature #${chosenFeature} of ${sae} (max ${fmt(max)} on this text).`
      : `Shaded by each token's strongest feature of ${sae} (max ${fmt(max)}).`;
    tokens.replaceChildren(...out.tokens.map((t) => h("button", {
      type: "button", class: "token", style: shade(value(t), max), "data-value": value(t),
      title: `${fmt(value(t))}`, "aria-label": `token ${t.index} ${tokenLabel(t.text)}: ${fmt(value(t))}`,
      onclick: () => detail.replaceChildren(topFeatures(sae, t)),
    }, tokenLabel(t.text))));
    detail.replaceChildren(h("p", { class: "hint" }, "Select a token to list its top features."));
  };

  main.replaceChildren(
    h("h1", {}, "Activations"),
    status.el,
    h("form", { class: "chat", onsubmit: analyse },
      h("div", { class: "row" },
        h("label", { for: "act-sae" }, "SAE"), select,
        h("label", { for: "act-feature" }, "Shade by feature"), feature),
      h("label", { for: "act-text" }, "Text"), text,
      h("div", { class: "row" }, h("button", { type: "submit", id: "act-run" }, "Read activations"))),
    runStatus.el,
    legend,
    tokens,
    detail,
  );
  text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) text.form.requestSubmit();
  });
}
