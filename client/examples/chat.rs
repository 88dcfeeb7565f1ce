//! A runnable example of `tether-client`: joins (or creates) a
//! conversation, sends one message, and prints every event, once, in order,
//! acknowledging each as it is printed.
//!
//! ```sh
//! cargo run --release &                        # the gateway
//! TOKEN=$(cargo run --release -q -- token alice)
//! cargo run -p tether-client --example chat -- http://127.0.0.1:8080 "$TOKEN" [CONVERSATION_ID]
//! ```
//!
//! Exits after the first message it sent comes back (`--follow` keeps it
//! running).

use tether_client::{Client, ClientError, ClientEvent, ClientOptions, Page, Rest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let follow = args.iter().any(|a| a == "--follow");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--follow").collect();
    let (Some(url), Some(token)) = (args.first(), args.get(1)) else {
        eprintln!("usage: chat URL TOKEN [CONVERSATION_ID] [--follow]");
        std::process::exit(2);
    };
    let rest = Rest::new(url, token.as_str());
    let id = match args.get(2) {
        Some(id) => id.parse()?,
        None => rest.create_conversation::<&str>(&[], "example").await?.id,
    };
    let mut client = Client::connect(ClientOptions::new(url.as_str(), token.as_str()));
    let chat = client.conversation(id, rest);
    let newest = chat.history(Page::Before(None), 5).await?;
    println!("conversation {id}: {} recent events", newest.events.len());

    // The send runs beside the reading loop: reading must go on meanwhile.
    let mut sending = tokio::spawn(chat.send("hello from the Rust example"));
    let (mut mine, mut seen) = (None, 0);
    loop {
        tokio::select! {
            r = &mut sending, if mine.is_none() => {
                let sent = r??;
                println!("stored as seq {}", sent.seq);
                mine = Some(sent.seq);
            }
            ev = client.next_event() => {
                let Some(ev) = ev else { break };
                match &ev {
                    ClientEvent::Event(e) => println!(
                        "{}#{} {} {}: {}",
                        e.conversation_id,
                        e.seq,
                        e.kind,
                        e.sender,
                        e.body.as_deref().unwrap_or("")
                    ),
                    ClientEvent::Error(ClientError::Gap { conversation_id, expected, got })
                        if *conversation_id == id =>
                    {
                        for e in chat.backfill(*expected, got - 1).await? {
                            println!("(back-filled) {}#{} {}", e.conversation_id, e.seq, e.kind);
                        }
                    }
                    ClientEvent::Error(e @ (ClientError::Config(_) | ClientError::Unauthorized(_))) => {
                        return Err(e.to_string().into());
                    }
                    other => println!("{other:?}"),
                }
                if let Some(e) = chat.message(&ev) {
                    seen = seen.max(e.seq);
                }
            }
        }
        if mine.is_some_and(|m| seen >= m) && !follow {
            break;
        }
    }
    client.close();
    while client.next_event().await.is_some() {}
    Ok(())
}
