// The Node half of scripts/cache-tests (docs/development.md, "The HTTP caching suite").
//
//   node scripts/cache-tests.mjs origin SUITE PORT      the suite's own test server on 127.0.0.1:PORT
//   node scripts/cache-tests.mjs run SUITE BASE MODE [ID] the suite's client against BASE
//   node scripts/cache-tests.mjs classify SUITE RESULTS  the suite's verdict for each test, as JSON
//
// origin: the suite's handlers (config, test, state, files) behind one http server, as its
// server.mjs dispatches them, except that a leading /v1 is dropped first. The proxy forwards
// only /v1/... (docs/http-contract.md), byte for byte, so the suite's client is pointed at
// http://proxy/v1 and its requests reach these handlers as /test/..., /config/..., /state/...
// SUITE is a checkout of https://github.com/http-tests/cache-tests (nothing in it is changed).
//
// run: what the suite's test-engine/cli.mjs does (every test a reverse proxy gets, 25 at a
// time; JSON results on stdout, or with ID that one test's exchanges and verdict), with
// MODE "stock" as the suite sends its requests, or "plain" without the two request headers
// its client adds to every request to keep a browser's own cache out (`Pragma: foo`,
// `Cache-Control: nothing-to-see-here`, with fetch's cache mode "no-store"; Node's fetch has no
// cache, and is asked for mode "force-cache", in which it adds no header of its own). Any Cache-Control or Pragma
// sends a request the long way (proxy/edge/fast.py), so only "plain" reaches the fast path,
// its joiners and the flight's starter; a test's own Cache-Control and Pragma stay.
//
// classify: RESULTS is the client's JSON output ({id: true | [kind, message]}); prints
// {id: {"result": name, "kind": required|optimal|check, "name": ..., "message": ...}} with the
// suite's own determineTestResult (dependencies honoured, as on cache-tests.fyi).
import http from 'node:http'
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const [mode, suite, arg] = process.argv.slice(2)
const load = (rel) => import(pathToFileURL(path.join(path.resolve(suite), rel)).href)

if (mode === 'origin') {
  const handlers = {
    config: (await load('test-engine/server/handle-config.mjs')).default,
    test: (await load('test-engine/server/handle-test.mjs')).default,
    state: (await load('test-engine/server/handle-state.mjs')).default
  }
  const handleFile = (await load('test-engine/server/handle-file.mjs')).default
  const base = `http://127.0.0.1:${arg}/`
  const server = http.createServer((request, response) => {
    const url = new URL(request.url.replace(/^\/v1(?=\/|$)/, ''), base)
    const segments = url.pathname.split('/').slice(1)
    // A body whose length is its connection's close (a Transfer-Encoding other than chunked,
    // which a test sets: headers-store-Transfer-Encoding) ends only when the connection does:
    // Node would hold it open until its keep-alive timeout, so close it after this response.
    const end = response.end
    response.end = function (...rest) {
      const coding = String(response.getHeader('transfer-encoding') || 'chunked')
      if (!response.headersSent && !/(^|,)\s*chunked\s*$/i.test(coding)) {
        response.shouldKeepAlive = false
      }
      return end.apply(this, rest)
    }
    const handler = handlers[segments.shift()]
    if (handler) handler(segments, request, response)
    else handleFile(url, request, response)
  })
  // Node closes an idle keep-alive connection after 5 s, the proxy's pool keeps one 15 s
  // (aiohttp's default): a request sent as Node closes fails, and a PUT of the suite's setup
  // is never sent again (an unsafe request, DESIGN.md), so its test fails. Like most origins,
  // this one keeps connections longer than its client. Since upstream.keepalive_timeout (4 s)
  // the proxy needs this no more (both modes gave the same verdicts at Node's 5 s); it stays
  // for --other trees from before it.
  server.keepAliveTimeout = 60 * 1000
  server.headersTimeout = 70 * 1000
  server.listen(Number(arg), '127.0.0.1', () => console.log(`Listening on ${base}`))
} else if (mode === 'run') {
  const [base, style, id] = process.argv.slice(4)
  if (style === 'plain') {
    const hack = new Set(['pragma\nfoo', 'cache-control\nnothing-to-see-here'])
    const fetch = globalThis.fetch
    globalThis.fetch = (url, init) => {
      if (init && Array.isArray(init.headers)) {
        const headers = init.headers.filter(([k, v]) => !hack.has(`${k.toLowerCase()}\n${v}`))
        // cache: 'no-store' is the other half of the hack: without those two headers, Node's
        // fetch (undici, no cache of its own) would add Pragma and Cache-Control: no-cache, as
        // it would in its default mode to a request with a conditional; 'force-cache' adds none.
        if (headers.length < init.headers.length && init.cache === 'no-store') {
          init.cache = 'force-cache'
        }
        init.headers = headers
      }
      return fetch(url, init)
    }
  }
  const tests = (await load('tests/index.mjs')).default
  const { runTests, getResults } = await load('test-engine/client/runner.mjs')
  let chosen = tests
  if (id) {
    chosen = []
    for (const testSuite of tests) {
      const test = testSuite.tests.find(t => t.id === id)
      if (test) chosen.push({ ...testSuite, tests: [{ ...test, dump: true }] })
    }
    if (!chosen.length) throw new Error(`no test ${id}`)
  }
  await runTests(chosen, false, base)
  const results = getResults()
  if (id) {
    const { determineTestResult } = await load('test-engine/lib/results.mjs')
    console.log(`==== ${determineTestResult(tests, id, results, false)[2]} ${results[id][1] || ''}`)
  } else {
    console.log(JSON.stringify(results, null, 2))
  }
} else if (mode === 'classify') {
  const tests = (await load('tests/index.mjs')).default
  const { determineTestResult, resultTypes } = await load('test-engine/lib/results.mjs')
  const names = new Map(Object.entries(resultTypes).map(([name, symbol]) => [symbol, name]))
  const results = JSON.parse(fs.readFileSync(arg, 'utf8'))
  const out = {}
  for (const testSuite of tests) {
    for (const test of testSuite.tests) {
      if (!(test.id in results)) continue
      const result = results[test.id]
      out[test.id] = {
        result: names.get(determineTestResult(tests, test.id, results)),
        kind: test.kind || 'required',
        name: test.name,
        message: result === true ? '' : String(result[1] || '')
      }
    }
  }
  console.log(JSON.stringify(out, null, 1))
} else {
  console.error('usage: cache-tests.mjs origin SUITE PORT | run SUITE BASE stock|plain [ID] |',
    'classify SUITE RESULTS.json')
  process.exit(2)
}
