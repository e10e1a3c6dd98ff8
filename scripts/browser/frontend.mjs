// Drives the real ComfyUI frontend of a running server in Debian's chromium (playwright-core from
// .cache/node, installed by scripts/setup.sh; no browser download).
//
//   node scripts/browser/frontend.mjs http://127.0.0.1:PORT  < commands.jsonl  > results.jsonl
//
// One JSON command per stdin line, one JSON result per stdout line ({"ok": true, ...} or
// {"ok": false, "error": "..."}), in order; the page stays open between commands, so a session
// pays the page load (~3 s) once. Diagnostics go to stderr. Commands:
//   {"cmd": "load_ui", "workflow": UI}        -> {missing, node_errors, prompt, node_count}
//       loads like File > Open; `missing` = node types the frontend does not know,
//       `prompt` = (await app.graphToPrompt()).output, the API graph the Run button would send
//   {"cmd": "api_to_ui", "api": API, "positions": {id: [x, y]}, "sizes": {id: [w, h]},
//    "notes": [{"text", "pos", "size", "title"}], "title": "name"}  -> {workflow}
//       app.loadApiJson(api) then app.graph.serialize(); positions/sizes/notes applied in the page
//       and every control_after_generate widget set to "fixed"
//   {"cmd": "queue"}                          -> {status, response} of the POST /api/prompt that
//       app.queuePrompt(0, 1) (the Run button) sent for the loaded graph
//   {"cmd": "screenshot", "path": "x.png"}    -> {path}; fits the graph to the view first
//   {"cmd": "console"}                        -> {messages}: console errors/warnings so far
import { createRequire } from "node:module";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");
const nodeDir = process.env.PLAYWRIGHT_NODE_DIR || path.join(root, ".cache", "node");
const require = createRequire(path.join(nodeDir, "package.json"));
const { chromium } = require("playwright-core");

const url = process.argv[2];
if (!url) {
  console.error("usage: node frontend.mjs http://127.0.0.1:PORT");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const log = (...a) => console.error("[frontend]", ...a);

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const context = await browser.newContext({ viewport: { width: 2400, height: 1500 } });
const allowed = new URL(url).host;
// Only the server under test: everything else (fonts, telemetry, templates CDN) is aborted.
await context.route("**/*", (route) => {
  const u = new URL(route.request().url());
  if ((u.protocol === "http:" || u.protocol === "https:" || u.protocol === "ws:")
      && u.host !== allowed) return route.abort();
  return route.continue();
});
const page = await context.newPage();
const consoleMessages = [];
page.on("console", (m) => {
  if (m.type() === "error" || m.type() === "warning") consoleMessages.push(`${m.type()}: ${m.text()}`);
});
page.on("pageerror", (e) => consoleMessages.push(`pageerror: ${e.message}`));

await page.goto(url, { waitUntil: "domcontentloaded", timeout: 60000 });
await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph
  && Object.keys(window.LiteGraph.registered_node_types || {}).length > 50, null, { timeout: 60000 });
log("page ready");

async function loadUi(workflow) {
  return await page.evaluate(async (wf) => {
    const known = window.LiteGraph.registered_node_types;
    const types = new Set();
    const walk = (nodes) => (nodes || []).forEach((n) => types.add(n.type));
    walk(wf.nodes);
    (wf.definitions?.subgraphs || []).forEach((s) => walk(s.nodes));
    const subgraphIds = new Set((wf.definitions?.subgraphs || []).map((s) => s.id));
    const missing = [...types].filter((t) => !known[t] && !subgraphIds.has(t));
    await window.app.loadGraphData(wf, true, true, wf.extra?.title || "workflow");
    const p = await window.app.graphToPrompt();
    // Close any dialog the load opened (missing nodes / models) so screenshots show the graph.
    document.querySelectorAll(".p-dialog-close-button").forEach((b) => b.click());
    const errors = window.app.graph.nodes.filter((n) => n.has_errors).map((n) => `${n.id}:${n.type}`);
    return { missing, node_errors: errors, prompt: p.output, node_count: window.app.graph.nodes.length };
  }, workflow);
}

async function apiToUi(cmd) {
  return await page.evaluate(async ({ api, positions, sizes, notes, title }) => {
    const app = window.app, LG = window.LiteGraph;
    const missing = Object.values(api).map((n) => n.class_type).filter((t) => !LG.registered_node_types[t]);
    if (missing.length) throw new Error(`unknown node types: ${[...new Set(missing)].join(", ")}`);
    app.loadApiJson(api, title || "workflow");
    for (const node of app.graph.nodes) {
      const p = positions?.[String(node.id)];
      if (p) node.pos = [p[0], p[1]];
      const s = sizes?.[String(node.id)];
      if (s) node.size = [Math.max(s[0], node.size[0]), Math.max(s[1], node.size[1])];
      for (const w of node.widgets || []) if (w.name === "control_after_generate") w.value = "fixed";
    }
    for (const n of notes || []) {
      const note = LG.createNode("Note");
      note.title = n.title || "Note";
      note.widgets[0].value = n.text;
      app.graph.add(note);
      note.pos = n.pos || [0, 0];
      if (n.size) note.size = n.size;
    }
    app.graph.setDirtyCanvas(true, true);
    return { workflow: app.graph.serialize() };
  }, cmd);
}

async function queue() {
  const waiter = page.waitForResponse((r) => r.url().endsWith("/prompt") && r.request().method() === "POST",
                                      { timeout: 60000 });
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  const r = await waiter;
  let body = null;
  try { body = await r.json(); } catch { body = await r.text(); }
  return { status: r.status(), response: body };
}

async function screenshot(file) {
  await page.evaluate(async () => {
    try { await window.app.extensionManager.command.execute("Comfy.Canvas.FitView"); }
    catch { window.app.canvas.ds.scale = 0.6; }
    window.app.graph.setDirtyCanvas(true, true);
  });
  await page.waitForTimeout(500);
  await page.screenshot({ path: file });
  return { path: file };
}

const handlers = {
  load_ui: (c) => loadUi(c.workflow),
  api_to_ui: (c) => apiToUi(c),
  queue: () => queue(),
  screenshot: (c) => screenshot(c.path),
  console: () => ({ messages: consoleMessages.slice() }),
};

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of rl) {
  if (!line.trim()) continue;
  let out;
  try {
    const cmd = JSON.parse(line);
    const fn = handlers[cmd.cmd];
    if (!fn) throw new Error(`unknown command ${cmd.cmd}`);
    out = { ok: true, ...(await fn(cmd)) };
  } catch (e) {
    out = { ok: false, error: String(e && e.stack || e) };
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}
await browser.close();
