// The socket.io peer of bench/bench.py's side-by-side scenario: what a presence
// service on socket.io 4 and Redis does per change. A client that connects is
// online: that is stored (HSET) and told to its user's watchers, as the hub tells
// them of a session that opens. It subscribes with the users it watches (a room
// each); a change of its message is stored, then emitted to the user's room
// through the Redis adapter, and acknowledged.
//
//   node socketio.mjs PORT REDIS_URL
import { createServer } from "node:http";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";
import { Server } from "socket.io";

const [port, redisUrl] = process.argv.slice(2);
const store = createClient({ url: redisUrl });
const pub = store.duplicate();
const sub = store.duplicate();
await Promise.all([store.connect(), pub.connect(), sub.connect()]);

const http = createServer();
const io = new Server(http, {
  adapter: createAdapter(pub, sub),
  transports: ["websocket"],
  perMessageDeflate: false,
  serveClient: false,
});
io.on("connection", (socket) => {
  const user = String(socket.handshake.query.user);
  let ver = 1;
  store
    .hSet(`p:${user}`, { status: "online", ver })
    .then(() => io.to(`u:${user}`).emit("presence", { user, message: null, ver: 1 }));
  socket.on("subscribe", async (users, ack) => {
    socket.join(users.map((u) => `u:${u}`));
    const messages = await Promise.all(users.map((u) => store.hGet(`p:${u}`, "message")));
    ack(users.map((u, n) => ({ user: u, message: messages[n] ?? null })));
  });
  socket.on("set_message", async (text, ack) => {
    const version = ++ver; // this change's, whatever others arrive while it is stored
    await store.hSet(`p:${user}`, { message: text, ver: version });
    io.to(`u:${user}`).emit("presence", { user, message: text, ver: version });
    ack({ ok: true });
  });
});
http.listen(Number(port), "127.0.0.1", () => console.log(`socket.io peer on ${port}`));
