// The IDE's real client against llm-proxy: LangChain JS ChatOpenAI as Konveyor's editor extension builds it
// (the bearer token as API key, the proxy as baseURL, temperature 0). Run by tests/test_ide_client.py.
// Input (argv[2], JSON): {baseURL, token, badToken, model}. Output: one JSON line with what each scenario saw.
import { ChatOpenAI } from "@langchain/openai";
import { HumanMessage } from "@langchain/core/messages";

const cfg = JSON.parse(process.argv[2]);

function chat(apiKey, extra = {}) {
  return new ChatOpenAI({
    model: cfg.model,
    temperature: 0,
    apiKey,
    maxRetries: 0,
    configuration: { baseURL: cfg.baseURL },
    ...extra,
  });
}

const weather = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

async function run(name, fn) {
  try {
    return [name, { ok: true, ...(await fn()) }];
  } catch (err) {
    return [name, { ok: false, status: err?.status ?? null, code: err?.lc_error_code ?? null,
                    message: String(err?.message ?? err) }];
  }
}

async function collect(stream) {
  let all;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    all = all === undefined ? chunk : all.concat(chunk);
  }
  return { all, chunks };
}

const results = Object.fromEntries([
  await run("invoke", async () => {
    const r = await chat(cfg.token).invoke([new HumanMessage("hello from the IDE")]);
    return { content: r.content, usage: r.usage_metadata ?? null, model: r.response_metadata?.model_name ?? null };
  }),
  await run("stream", async () => {
    const { all, chunks } = await collect(await chat(cfg.token).stream([new HumanMessage("stream please")]));
    return { content: all.content, chunks, usage: all.usage_metadata ?? null };
  }),
  await run("stream_no_usage", async () => {
    const llm = chat(cfg.token, { streamUsage: false });
    const { all, chunks } = await collect(await llm.stream([new HumanMessage("no usage")]));
    return { content: all.content, chunks, usage: all.usage_metadata ?? null };
  }),
  await run("tools", async () => {
    const r = await chat(cfg.token).bindTools([weather]).invoke([new HumanMessage("weather?")]);
    return { tool_calls: r.tool_calls };
  }),
  await run("stream_tools", async () => {
    const llm = chat(cfg.token).bindTools([weather]);
    const { all, chunks } = await collect(await llm.stream([new HumanMessage("weather, streamed?")]));
    return { tool_calls: all.tool_calls, chunks, usage: all.usage_metadata ?? null };
  }),
  await run("bad_token", async () => {
    const r = await chat(cfg.badToken).invoke([new HumanMessage("should not pass")]);
    return { content: r.content };
  }),
]);
process.stdout.write(JSON.stringify(results) + "\n");
