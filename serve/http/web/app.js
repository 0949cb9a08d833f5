// The explorer's entry: the API-key form and hash routing (#/, #/sae/ID, #/sae/ID/feature/N, #/playground,
// #/activations), so every page is linkable.

import { apiKey, setApiKey } from "./api.js";
import { activationsView } from "./activations.js";
import { h } from "./dom.js";
import { featureView } from "./feature.js";
import { playgroundView } from "./playground.js";
import { homeView, saeView } from "./sae.js";

const main = document.getElementById("view");

function route() {
  // Each visit renders into its own element, so a slow view left behind never writes into the next page.
  const view = h("div");
  main.replaceChildren(view);
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const link of document.querySelectorAll("header nav a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#/${parts[0] || ""}`);
  }
  if (parts[0] === "playground") return playgroundView(view, params);
  if (parts[0] === "activations") return activationsView(view, params);
  if (parts[0] === "sae" && parts.length === 2) return saeView(view, parts[1]);
  if (parts[0] === "sae" && parts.length === 4 && parts[2] === "feature" && /^\d+$/.test(parts[3])) {
    return featureView(view, parts[1], Number(parts[3]));
  }
  if (parts.length === 0) return homeView(view);
  view.replaceChildren(h("h1", {}, "Not found"),
    h("p", { role: "alert" }, `There is no page at “${location.hash}”.`), h("a", { href: "#/" }, "Loaded SAEs"));
}

function keyForm() {
  const input = document.getElementById("api-key");
  const note = document.getElementById("key-note");
  input.value = apiKey();
  document.getElementById("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(input.value.trim());
    note.textContent = input.value.trim() ? "Key saved for this tab." : "Key cleared.";
    route();
  });
}

keyForm();
window.addEventListener("hashchange", route);
route();
