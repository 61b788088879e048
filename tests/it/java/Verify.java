// An independent reader for the integration tests: the official Java consumer (kafka-clients)
// reads a topic from the beginning of every partition and prints each record on one line:
//
//   R <partition> <offset> <key hex or -> <value hex or -> <header name hex>=<value hex or ->,...
//
// Run as a single-file source program on Kafka's classpath (tests/it/support.rs: java_read):
//   java -cp "$LIB/*" tests/it/java/Verify.java BROKERS TOPIC EXPECTED_COUNT TIMEOUT_MS
// It stops after EXPECTED_COUNT records or TIMEOUT_MS, whichever comes first, and exits 0; the
// test compares the records with what rdkafka read. Other output lines (logging) are ignored.
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class Verify {
    static String hex(byte[] b) {
        return b == null ? "-" : (b.length == 0 ? "" : HexFormat.of().formatHex(b));
    }

    public static void main(String[] args) {
        String brokers = args[0], topic = args[1];
        long expected = Long.parseLong(args[2]);
        long deadline = System.currentTimeMillis() + Long.parseLong(args[3]);
        Properties p = new Properties();
        p.put("bootstrap.servers", brokers);
        p.put("key.deserializer", ByteArrayDeserializer.class.getName());
        p.put("value.deserializer", ByteArrayDeserializer.class.getName());
        p.put("enable.auto.commit", "false");
        p.put("isolation.level", "read_committed");
        p.put("auto.offset.reset", "earliest");
        try (KafkaConsumer<byte[], byte[]> c = new KafkaConsumer<>(p)) {
            List<TopicPartition> parts = new ArrayList<>();
            for (PartitionInfo i : c.partitionsFor(topic, Duration.ofSeconds(30))) {
                parts.add(new TopicPartition(topic, i.partition()));
            }
            c.assign(parts);
            c.seekToBeginning(parts);
            long n = 0;
            StringBuilder out = new StringBuilder();
            while (n < expected && System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<byte[], byte[]> r : c.poll(Duration.ofMillis(200))) {
                    out.setLength(0);
                    out.append("R ").append(r.partition()).append(' ').append(r.offset()).append(' ')
                        .append(hex(r.key())).append(' ').append(hex(r.value())).append(' ');
                    boolean first = true;
                    for (Header h : r.headers()) {
                        if (!first) out.append(',');
                        first = false;
                        out.append(hex(h.key().getBytes(java.nio.charset.StandardCharsets.UTF_8)))
                            .append('=').append(hex(h.value()));
                    }
                    if (first) out.append('.');
                    System.out.println(out);
                    n++;
                }
            }
        }
    }
}
