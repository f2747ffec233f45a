#!/usr/bin/python3
"""A TCP client made of crafted packets, for the adversarial tests: it opens a connection
from an address its own kernel does not have (so that kernel never answers the SYN-ACK
with a reset), shapes the packets as an attacker would, sends one line and reports what
came back, as one JSON line.

  craft.py --iface eth0 --src ADDR --dst ADDR --dport PORT --shape SHAPE

Shapes: plain, ipopts (IPv4 options on every packet), hopopts, dstopts, rthdr (IPv6
extension headers on every packet), frag (the SYN in 8-byte IPv4 fragments, so the TCP
flags are not in the first one), frag6 (the SYN in IPv6 fragments of 8 bytes: dropped by
the kernel, RFC 8200), frag6data (a SYN with data in IPv6 fragments), badsum (TCP checksum
wrong), doff (TCP data offset below 5), ihl (IPv4 header length past the packet).
"""
import argparse
import json
import random
import time

from scapy.all import (IP, IPOption_NOP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                       IPv6ExtHdrRouting, PadN, TCP, AsyncSniffer, conf, fragment, fragment6, send)

conf.verb = 0

ap = argparse.ArgumentParser()
ap.add_argument("--iface", required=True)
ap.add_argument("--src", required=True)
ap.add_argument("--dst", required=True)
ap.add_argument("--dport", type=int, required=True)
ap.add_argument("--shape", default="plain")
ap.add_argument("--send", default="hello")
ap.add_argument("--timeout", type=float, default=2.0)
a = ap.parse_args()

v6 = ":" in a.dst
sport = random.randint(20000, 60000)
seq = random.randint(1, 2**31)


def l3():
    if v6:
        base = IPv6(src=a.src, dst=a.dst)
        if a.shape == "hopopts":
            return base / IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0\0\0\0")])
        if a.shape == "dstopts":
            return base / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0\0\0\0")])
        if a.shape == "rthdr":
            return base / IPv6ExtHdrRouting(type=0, segleft=0, addresses=[])
        return base
    if a.shape == "ipopts":
        return IP(src=a.src, dst=a.dst, options=[IPOption_NOP()] * 4)
    return IP(src=a.src, dst=a.dst)


def ours(p):
    net = p.getlayer(IPv6 if v6 else IP)
    return net is not None and p.haslayer(TCP) and net.src == a.dst and p[TCP].dport == sport and p[TCP].sport == a.dport


seen = []  # AsyncSniffer.results is only filled when it stops
sniffer = AsyncSniffer(iface=a.iface, lfilter=ours, prn=seen.append, store=False)
sniffer.start()
time.sleep(0.3)

syn = l3() / TCP(sport=sport, dport=a.dport, flags="S", seq=seq, options=[("MSS", 1400)])
if a.shape == "badsum":
    syn[TCP].chksum = 0x1234
if a.shape == "doff":
    syn[TCP].dataofs = 4
if a.shape == "ihl":
    syn = IP(src=a.src, dst=a.dst, ihl=15) / syn[TCP]
if a.shape == "frag":
    pkts = fragment(syn, fragsize=8)
elif a.shape == "frag6":
    pkts = fragment6(l3() / IPv6ExtHdrFragment() / syn[TCP], 56)
elif a.shape == "frag6data":
    # a SYN carrying data, in fragments whose first holds the whole TCP header
    pkts = fragment6(l3() / IPv6ExtHdrFragment() / syn[TCP] / (b"x" * 64), 96)
else:
    pkts = [syn]
for p in pkts:
    send(p)

out = {"shape": a.shape, "synack": False}
deadline = time.time() + a.timeout
synack = None
while time.time() < deadline and synack is None:
    for p in list(seen):
        if p[TCP].flags & 0x12 == 0x12:
            synack = p
            break
    time.sleep(0.05)
if synack is not None:
    out["synack"] = True
    ack = synack[TCP].seq + 1
    send(l3() / TCP(sport=sport, dport=a.dport, flags="A", seq=seq + 1, ack=ack))
    data = (a.send + "\n").encode()
    send(l3() / TCP(sport=sport, dport=a.dport, flags="PA", seq=seq + 1, ack=ack) / data)
    reply = b""
    deadline = time.time() + a.timeout
    while time.time() < deadline and b"\n" not in reply:
        reply = b"".join(bytes(p[TCP].payload) for p in list(seen) if len(p[TCP].payload))
        time.sleep(0.05)
    out["reply"] = reply.decode(errors="replace").split("\n")[0]
    send(l3() / TCP(sport=sport, dport=a.dport, flags="R", seq=seq + 1 + len(data)))
sniffer.stop()
out["sport"] = sport
print(json.dumps(out), flush=True)
