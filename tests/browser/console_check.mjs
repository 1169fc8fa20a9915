// The console page in a real Chromium (Debian's, driven by playwright-core), against a pipeline
// that tests/tests/integration/browser.rs started. Each check prints one line; a failure exits
// non-zero with the reason. To have the results service restarted mid-job it prints
// "RESTART RESULTS" and waits for a line on stdin.
//
// Environment: SLUICE_RESULTS_URL, SLUICE_INGEST_URL, SLUICE_API_KEY, SLUICE_SCREENSHOT_DIR,
// CHROMIUM (default /usr/bin/chromium).

import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const results = process.env.SLUICE_RESULTS_URL;
const ingest = process.env.SLUICE_INGEST_URL;
const key = process.env.SLUICE_API_KEY;
const shots = process.env.SLUICE_SCREENSHOT_DIR;
const stdin = createInterface({ input: process.stdin });
const lines = stdin[Symbol.asyncIterator]();

let browser;
function check(name, condition, detail = "") {
  if (!condition) {
    console.log(`FAILED ${name}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    browser?.close();
    process.exit(1);
  }
  console.log(`ok ${name}`);
}

async function submitThroughApi(content) {
  const response = await fetch(`${ingest}/v1/jobs`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${key}` },
    body: JSON.stringify({ model: "sim", messages: [{ role: "user", content }] }),
  });
  if (response.status !== 202) throw new Error(`submit: ${response.status} ${await response.text()}`);
  return response.json();
}

browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // As root, without the machine's background network calls (see the machine notes).
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1000, height: 1100 } });
page.on("pageerror", (error) => check("no script error on the page", false, error.message));
await page.goto(`${results}/`);
await page.fill("#api-key", key);
await page.press("#api-key", "Tab");

// Watches what the page shows: every state line and every answer text, as they change.
await page.evaluate(() => {
  window.__seen = { states: [], answers: [] };
  const record = (list, node) => new MutationObserver(() => list.push(node.textContent)).observe(node, { childList: true, characterData: true, subtree: true });
  record(window.__seen.states, document.getElementById("job-state"));
  record(window.__seen.answers, document.getElementById("answer"));
});
const seen = () => page.evaluate(() => window.__seen);
const stateIs = (text, timeout = 30000) => page.waitForFunction((text) => document.getElementById("job-state").textContent.startsWith(text), text, { timeout });

// 1. A streamed answer, behind three queued jobs: the position falls, the text grows.
for (let index = 0; index < 3; index++) await submitThroughApi(`backlog ${index}`);
const words = "one two three four five six seven eight nine ten";
await page.fill("#prompt", words);
await page.click("#submit");
await stateIs("Succeeded");
let shown = await seen();
const positions = shown.states.map((text) => /^Queued: (\d+)/.exec(text)).filter(Boolean).map((match) => Number(match[1]));
check("queue positions shown and falling", positions.length >= 2 && positions.every((value, index) => index === 0 || value <= positions[index - 1]) && positions.at(-1) === 0, positions);
check("running shown", shown.states.some((text) => text.startsWith("Running")), shown.states);
const growing = [...new Set(shown.answers.filter((text) => text.length > 0))];
check("the answer grows in steps as tokens arrive", growing.length >= 3 && growing.every((text) => `echo: ${words}`.startsWith(text)), growing);
check("the whole answer", (await page.textContent("#answer")) === `echo: ${words}`, await page.textContent("#answer"));
check("timings shown", (await page.textContent("#timings")).includes("Queue wait"), await page.textContent("#timings"));
await page.waitForFunction(() => document.querySelectorAll("#recent tr").length >= 4);
check("recent jobs listed", (await page.locator("#recent tr").count()) >= 4);
await page.screenshot({ path: `${shots}/console.png`, fullPage: true });

// 2. A second job cancelled from the page.
await page.fill("#prompt", "cancel me please");
await page.click("#submit");
// Queued or already running (1.2 s of model time): either way it is cancelled.
await page.waitForFunction(() => /^(Queued|Running)/.test(document.getElementById("job-state").textContent));
await page.click("#cancel");
await stateIs("Cancelled");
check("cancelled from the page", true);

// 3. The results service restarted mid-answer: the page reconnects and shows nothing twice.
await page.fill("#prompt", `${words} and then some more words to stream slowly`);
await page.click("#submit");
await page.waitForFunction(() => document.getElementById("answer").textContent.length > 0, null, { timeout: 30000 });
console.log("RESTART RESULTS");
await lines.next();
await stateIs("Succeeded", 60000);
const expected = `echo: ${words} and then some more words to stream slowly`;
const joined = await page.evaluate(() => job.text);
check("after the restart, the deltas join into the answer exactly once", joined === expected, joined);
const timeline = await page.$$eval("#timeline li span", (items) => items.map((item) => item.textContent));
const count = (name) => timeline.filter((text) => text.startsWith(name)).length;
check("no event shown twice", count("queued") === 1 && count("running") === 1 && count("succeeded") === 1, timeline);

// 4. Only a job's events_url, no key: the page follows that job; the token on another job: 404.
const followed = await submitThroughApi("followed by url");
const other = await submitThroughApi("not this one");
const viewer = await browser.newPage();
await viewer.goto(`${results}/#follow=${encodeURIComponent(followed.events_url)}`);
await viewer.waitForFunction(() => document.getElementById("job-state").textContent.startsWith("Succeeded"), null, { timeout: 30000 });
check("followed with only its events_url", (await viewer.textContent("#answer")) === "echo: followed by url");
check("no key field when following", await viewer.isHidden("#key-section"));
const token = new URL(followed.events_url).searchParams.get("token");
const wrong = `${results}/v1/jobs/${other.job_id}/events?token=${token}`;
const status = await viewer.evaluate(async (url) => (await fetch(url)).status, wrong);
check("the token on another job's URL is 404", status === 404, status);
const stranger = await browser.newPage();
await stranger.goto(`${results}/#follow=${encodeURIComponent(wrong)}`);
await stranger.waitForFunction(() => document.getElementById("job-error").textContent.includes("404"), null, { timeout: 30000 });
check("the page says the job is not found", (await stranger.textContent("#job-error")).includes("job_not_found"), await stranger.textContent("#job-error"));

await browser.close();
console.log("all browser checks passed");
process.exit(0);
