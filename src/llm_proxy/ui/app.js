// The usage dashboard: reads /ui/api/usage (the ledger's report) and draws it with the vendored Chart.js.
'use strict';

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat('en-US');
const charts = {};

function show(id, on) { $(id).hidden = !on; }

function range() {
  const preset = $('preset').value;
  if (preset !== 'custom') return { from: preset };
  const out = {};
  if ($('from').value) out.from = $('from').value;
  if ($('to').value) {  // the end day is included: the report's `to` is exclusive
    const end = new Date($('to').value + 'T00:00:00Z');
    end.setUTCDate(end.getUTCDate() + 1);
    out.to = end.toISOString().slice(0, 10);
  }
  return out;
}

async function report(groupBy, extra) {
  const q = new URLSearchParams({ ...range(), group_by: groupBy, ...(extra || {}) });
  const r = await fetch('/ui/api/usage?' + q, { credentials: 'same-origin' });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : 'HTTP ' + r.status);
  return body;
}

function ms(v) { return v == null ? '-' : fmt.format(Math.round(v)) + ' ms'; }

function cards(t, latency) {
  const p = latency || {};
  $('latency-pct').textContent = p.p50 == null ? '-'
    : [p.p50, p.p95, p.p99].map((v) => fmt.format(Math.round(v))).join(' / ') + ' ms';
  // The ledger has a cost per row once prices are configured (usage rows' cost_usd).
  const cost = t.cost_usd ?? t.total_cost_usd;
  show('cost-card', cost != null);
  if (cost != null) $('total-cost').textContent = '$' + Number(cost).toFixed(2);
  $('total-requests').textContent = fmt.format(t.requests || 0);
  $('total-errors').textContent = fmt.format(t.errors || 0);
  $('error-rate').textContent = t.requests ? (100 * (t.errors || 0) / t.requests).toFixed(1) + ' %' : '-';
  $('total-prompt').textContent = fmt.format(t.prompt_tokens || 0);
  $('total-completion').textContent = fmt.format(t.completion_tokens || 0);
  $('total-tokens').textContent = fmt.format(t.total_tokens || 0);
  $('avg-latency').textContent = ms(t.avg_latency_ms);
  $('avg-ttft').textContent = ms(t.avg_ttft_ms);
}

function draw(id, config) {
  if (charts[id]) charts[id].destroy();
  charts[id] = new Chart($(id), config);
}

// A report's rows without a group (the caller had none) are the report's null group.
const NO_GROUP = '(no group)';
const groupName = (r) => r.group ?? NO_GROUP;

// Tokens per day of the 8 largest series of a `day,<key>` report; key(r) names a row's series, name(r) labels it.
function topPerDay(id, rows, key, name) {
  const tokens = {};
  for (const r of rows) tokens[key(r)] = (tokens[key(r)] || 0) + (r.total_tokens || 0);
  const top = Object.keys(tokens).sort((a, b) => tokens[b] - tokens[a]).slice(0, 8);
  const days = [...new Set(rows.map((r) => r.day))].sort();
  const names = Object.fromEntries(rows.map((r) => [key(r), name(r)]));
  const cell = (day, k) => rows.filter((r) => r.day === day && key(r) === k)
    .reduce((n, r) => n + (r.total_tokens || 0), 0);
  draw(id, {
    type: 'line',
    data: { labels: days, datasets: top.map((k) => ({ label: names[k], data: days.map((d) => cell(d, k)) })) },
    options: { animation: false, responsive: true },
  });
}

function byDay(rows) {
  const days = [...new Set(rows.map((r) => r.day))].sort();
  const models = [...new Set(rows.map((r) => r.model || '(none)'))].sort();
  const cell = (day, model, key) => rows
    .filter((r) => r.day === day && (r.model || '(none)') === model)
    .reduce((n, r) => n + (r[key] || 0), 0);
  draw('by-day', {
    type: 'bar',
    data: { labels: days, datasets: models.map((m) => ({ label: m, data: days.map((d) => cell(d, m, 'total_tokens')) })) },
    options: { animation: false, responsive: true, scales: { x: { stacked: true }, y: { stacked: true } } },
  });
  const total = (day, key) => rows.filter((r) => r.day === day).reduce((n, r) => n + (r[key] || 0), 0);
  draw('errors-by-day', {
    type: 'line',
    data: { labels: days, datasets: [
      { label: 'requests', data: days.map((d) => total(d, 'requests')) },
      { label: 'errors', data: days.map((d) => total(d, 'errors')) },
    ] },
    options: { animation: false, responsive: true },
  });
}

function table(id, rows, cols) {
  const body = $(id).querySelector('tbody');
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement('tr');
    for (const c of cols) {
      const td = document.createElement('td');
      td.textContent = c(r);
      tr.append(td);
    }
    return tr;
  }));
}

async function refresh() {
  $('status').textContent = '';
  const q = new URLSearchParams({ ...range(), group_by: 'day,user,model,group' });
  $('csv').href = '/ui/api/usage.csv?' + q;
  try {
    const [days, users, models, perUser, groups, perGroup] = await Promise.all([
      report('day,model', { percentiles: '1' }), report('user'), report('model'), report('day,user'),
      report('group'), report('day,group')]);
    cards(days.totals, days.latency_ms);
    show('users-chart', days.scope === 'all');
    if (days.scope === 'all') topPerDay('by-user', perUser.data, (r) => r.user, (r) => r.username || r.user);
    topPerDay('by-group', perGroup.data, groupName, groupName);
    $('scope').textContent = days.scope === 'all' ? 'Everyone\u2019s usage (administrator)' : 'Your usage';
    byDay(days.data);
    const top = [...users.data].sort((a, b) => (b.total_tokens || 0) - (a.total_tokens || 0)).slice(0, 20);
    table('users', top, [(r) => r.username || r.user || '(anonymous)', (r) => fmt.format(r.requests),
      (r) => fmt.format(r.errors), (r) => fmt.format(r.total_tokens || 0)]);
    table('models', models.data, [(r) => r.model || '(none)', (r) => fmt.format(r.requests),
      (r) => fmt.format(r.errors), (r) => fmt.format(r.total_tokens || 0), (r) => ms(r.avg_latency_ms)]);
    const byTokens = [...groups.data].sort((a, b) => (b.total_tokens || 0) - (a.total_tokens || 0));
    table('groups', byTokens, [groupName, (r) => fmt.format(r.requests), (r) => fmt.format(r.errors),
      (r) => fmt.format(r.total_tokens || 0), (r) => (r.cost_usd == null ? '-' : '$' + Number(r.cost_usd).toFixed(2))]);
    document.body.dataset.loaded = 'true';
  } catch (e) {
    $('status').textContent = String(e.message || e);
  }
}

async function start() {
  const r = await fetch('/ui/api/me', { credentials: 'same-origin' });
  const me = await r.json();
  if (!me.signed_in) {
    show('signin', true);
    show('login', me.login);
    return;
  }
  $('who').textContent = me.name + (me.admin ? ' (admin)' : '');
  show('logout', true);
  show('dash', true);
  $('range').addEventListener('submit', (ev) => { ev.preventDefault(); refresh(); });
  $('preset').addEventListener('change', () => { if ($('preset').value !== 'custom') refresh(); });
  $('logout').addEventListener('click', async () => {
    await fetch('/ui/logout', { method: 'POST', credentials: 'same-origin' });
    location.reload();
  });
  await refresh();
}

start();
