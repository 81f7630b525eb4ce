// An HBONE server on Node's http2 (nghttp2 inside): mTLS that demands a client certificate
// from the given root, TLS 1.3, ALPN h2; each CONNECT is dialled as TCP and spliced with
// half-close passed on both ways (END_STREAM <-> FIN).
//
//   node hbone_server.js HOST PORT CA CERT KEY
//
// Prints JSON lines on stdout: {"event":"listening"} once, then one
// {"event":"connect", authority, peer_san, headers} per CONNECT. Other methods get 405.
// Used by tests/interop/test_node_http2.py.
'use strict';

const fs = require('fs');
const http2 = require('http2');
const net = require('net');

const [host, port, caPath, certPath, keyPath] = process.argv.slice(2);
const log = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

const server = http2.createSecureServer({
  ca: fs.readFileSync(caPath),
  cert: fs.readFileSync(certPath),
  key: fs.readFileSync(keyPath),
  requestCert: true,
  rejectUnauthorized: true,
  minVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
});

server.on('stream', (stream, headers) => {
  if (headers[':method'] !== 'CONNECT') {
    stream.respond({ ':status': 405 }, { endStream: true });
    return;
  }
  const authority = headers[':authority'];
  const cert = stream.session.socket.getPeerCertificate();
  const plain = {};
  for (const [k, v] of Object.entries(headers)) {
    if (!k.startsWith(':')) plain[k] = v;
  }
  log({ event: 'connect', authority, peer_san: cert.subjectaltname || null, headers: plain });
  const at = authority.lastIndexOf(':');
  const socket = net.connect({
    host: authority.slice(0, at).replace(/^\[|\]$/g, ''),
    port: Number(authority.slice(at + 1)),
    allowHalfOpen: true,
  });
  socket.setNoDelay(true);
  socket.on('connect', () => {
    stream.respond({ ':status': 200 });
    stream.pipe(socket); // END_STREAM -> socket.end() (FIN)
    socket.pipe(stream); // FIN -> stream.end() (END_STREAM)
  });
  socket.on('error', () => {
    if (!stream.headersSent) {
      stream.respond({ ':status': 503 }, { endStream: true });
    } else {
      stream.close(http2.constants.NGHTTP2_CANCEL);
    }
  });
  stream.on('error', () => socket.destroy());
  stream.on('close', () => {
    // A reset stream abandons the TCP side; a clean close leaves its queued bytes to flush.
    if (stream.rstCode !== http2.constants.NGHTTP2_NO_ERROR) socket.destroy();
  });
});

server.listen(Number(port), host, () => log({ event: 'listening' }));
